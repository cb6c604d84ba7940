"""`DataConfig`: where text comes from, how it is split and limited, where caches live."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from data.errors import DataError
from data.packing import Packing

SOURCES = ("shakespeare", "hf", "local")
PACKINGS = ("stream", "bos")
DOC_SEPARATORS = ("blank_line", "file", "line")


@dataclass
class DataConfig:
    """The data section of a run (mirrors `conf/data/*.yaml` one to one).

    source: `shakespeare` (the built-in default corpus), `hf` (a Hugging Face dataset,
      streamed) or `local` (globs of .txt / .jsonl / .parquet files, streamed by `datasets`).
    path: the `hf` dataset id (`roneneldan/TinyStories`).
    name, split: the `hf` dataset's config name and its train split.
    text_field: the column holding the text (`hf`, and `local` JSON Lines / Parquet).
    paths: `local` globs, e.g. `["corpus/*.txt"]`, relative to the working directory.
    doc_separator: how `.txt` files split into documents: `blank_line`, `file` or `line`.
    max_docs: read at most this many documents (per split when the source has its own
      validation split).
    max_tokens: cut the train split to this many tokens.
    val_docs: hold out this many documents (the first ones of the stream; for `shakespeare`,
      this many whole plays chosen by a fixed hash). An `hf` dataset with a `validation` split
      uses that split instead.
    val_fraction: when val_docs is null, hold out every round(1/val_fraction)-th document (the
      share of plays for `shakespeare`).
    cache_dir: where tokenizers and token caches are stored (relative to the working directory).
    tokenizer: an existing tokenizer directory (e.g. a downloaded Qwen3 one); null = train one.
    vocab_size: the vocabulary to train; null = the model's vocab_size.
    tokenizer_max_bytes: the most text (UTF-8 bytes) the tokenizer trainer reads.
    shard_tokens: train tokens per cache shard; a killed build keeps its finished shards.
    sources: a weighted mixture instead of one source: a list of mappings, each with `weight`
      (>= 0; batches draw windows in proportion), an optional `label` (names its val metrics)
      and any keys above that differ from the ones here, which every source inherits
      (`cache_dir`, `vocab_size` and `tokenizer_max_bytes` are the mixture's own). Each source
      has its own cache; the tokenizer is shared (trained on a weighted sample, or given).
    packing: how training rows are cut: `stream` (windows at any offset, across documents) or
      `bos` (every row starts at a document start; whole documents packed best-fit, the ones
      that do not fit cropped: data/packing.py, docs/data.md#packing).
    packing_window: documents at hand for `bos`'s best fit (more: fewer tokens cropped).
    document_mask: with `bos`, attention stays inside each document and RoPE positions restart
      at every document (qwen3/documents.py).
    """

    source: Literal["shakespeare", "hf", "local"] = "shakespeare"
    path: str | None = None
    name: str | None = None
    split: str = "train"
    text_field: str = "text"
    paths: list[str] = field(default_factory=list)
    doc_separator: Literal["blank_line", "file", "line"] = "blank_line"
    max_docs: int | None = None
    max_tokens: int | None = None
    val_docs: int | None = None
    val_fraction: float = 0.05
    cache_dir: str = ".cache/data"
    tokenizer: str | None = None
    vocab_size: int | None = None
    tokenizer_max_bytes: int = 200_000_000
    shard_tokens: int = 250_000_000
    sources: list[dict[str, Any]] = field(default_factory=list)
    packing: Literal["stream", "bos"] = "stream"
    packing_window: int = 128
    document_mask: bool = False

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise DataError(f"data.source={self.source!r} is unknown: choose one of {SOURCES}")
        if self.doc_separator not in DOC_SEPARATORS:
            raise DataError(
                f"data.doc_separator={self.doc_separator!r} is unknown: choose one of "
                f"{DOC_SEPARATORS}"
            )
        if self.source == "hf" and not self.path:
            raise DataError(
                "data.source=hf needs data.path, the dataset id (e.g. data.path=roneneldan/TinyStories)"
            )
        if self.source == "local":
            if isinstance(self.paths, str):
                self.paths = [self.paths]
            if not self.paths:
                raise DataError(
                    "data.source=local needs data.paths, a list of globs "
                    "(e.g. data.paths='[corpus/*.txt]')"
                )
        for key in ("max_docs", "max_tokens", "vocab_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise DataError(f"data.{key}={value} must be positive, or null for no limit")
        if self.val_docs is not None and self.val_docs < 1:
            raise DataError(
                f"data.val_docs={self.val_docs} must be at least 1 (a run needs a validation split)"
            )
        if not 0.0 < self.val_fraction <= 0.5:
            raise DataError(f"data.val_fraction={self.val_fraction} must be in (0, 0.5], e.g. 0.05")
        if self.shard_tokens < 1:
            raise DataError(
                f"data.shard_tokens={self.shard_tokens} must be positive, e.g. 250000000"
            )
        if self.tokenizer_max_bytes < 1:
            raise DataError(f"data.tokenizer_max_bytes={self.tokenizer_max_bytes} must be positive")
        if self.packing not in PACKINGS:
            raise DataError(f"data.packing={self.packing!r} is unknown: choose one of {PACKINGS}")
        self.rows(0)  # checks packing_window and document_mask
        if not self.text_field:
            raise DataError("data.text_field must name the text column, e.g. data.text_field=text")
        if self.sources:
            self.mixture()  # checks every source now, before any data is read

    def mixture(self) -> list[MixtureSource]:
        """The sources of `data.sources`, each a full DataConfig; [] for a single source."""
        if not self.sources:
            return []
        out: list[MixtureSource] = []
        for i, entry in enumerate(self.sources):
            key = f"data.sources[{i}]"
            if not isinstance(entry, dict):
                raise DataError(
                    f"{key}={entry!r} must be a mapping, e.g. {{source: hf, weight: 1}}"
                )
            values = dict(entry)
            weight, label = values.pop("weight", 1.0), values.pop("label", None)
            fields = {f.name for f in dataclasses.fields(self)} - set(_MIXTURE_OWN)
            unknown = sorted(set(values) - fields)
            if unknown:
                raise DataError(
                    f"{key}.{unknown[0]} is not a per-source key: use weight, label or one of "
                    f"{sorted(fields)} ({', '.join(_MIXTURE_OWN)} are set once, as data.KEY)"
                )
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                raise DataError(f"{key}.weight={weight!r} must be a number >= 0, e.g. 0.3")
            if not math.isfinite(weight) or weight < 0:
                raise DataError(f"{key}.weight={weight} must be a finite number >= 0, e.g. 0.3")
            try:
                cfg = dataclasses.replace(self, sources=[], **values)
            except DataError as err:
                raise DataError(f"{key}: {err}") from None
            except TypeError as err:  # a value of the wrong type reached a comparison
                raise DataError(f"{key}: {err}; check the types of its values") from None
            out.append(MixtureSource(str(label or default_label(cfg, i)), float(weight), cfg))
        if not any(s.weight > 0 for s in out):
            raise DataError(
                "data.sources: every weight is 0, so no batch could draw from any source: give "
                "at least one source a positive weight"
            )
        labels = [s.label for s in out]
        if len(set(labels)) != len(labels):
            raise DataError(f"data.sources: labels {labels} repeat: give each source its own label")
        tokenizers = {s.config.tokenizer for s in out}
        if len(tokenizers) > 1:
            raise DataError(
                f"data.sources disagree on the tokenizer ({sorted(map(str, tokenizers))}): a "
                f"mixture shares one; set data.tokenizer once (or null to train one on all sources)"
            )
        return out

    def rows(self, separator: int) -> Packing:
        """How the sampler cuts rows, given the id that ends each document in the cache."""
        return Packing(self.packing, self.packing_window, self.document_mask, separator)

    @property
    def holdout_every(self) -> int:
        """Every this-many-th document goes to validation when the hold-out rule applies."""
        return max(2, round(1 / self.val_fraction))


# Keys a mixture sets once for all its sources.
_MIXTURE_OWN = (
    "sources",
    "cache_dir",
    "vocab_size",
    "tokenizer_max_bytes",
    "packing",
    "packing_window",
    "document_mask",
)


@dataclass
class MixtureSource:
    """One source of a mixture: its metric label, its weight and its full data config."""

    label: str
    weight: float
    config: DataConfig


def default_label(cfg: DataConfig, index: int) -> str:
    """A source's name in metrics (`val_loss/<label>`) when its entry has no `label`."""
    if cfg.source == "hf" and cfg.path:
        return cfg.path.rsplit("/", 1)[-1]
    if cfg.source == "local":
        return f"local{index}"
    return cfg.source
