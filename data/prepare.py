"""`prepare_data`: sources -> tokenizer (trained or given) -> token caches, each cached by
fingerprint; one source, or a weighted mixture of several."""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data.cache_build import build_token_cache
from data.config import DataConfig, MixtureSource, default_label
from data.errors import DataError
from data.sources import (
    OnePass,
    hf_has_validation,
    source_spec,
    split_documents,
    validation_documents,
)
from data.token_cache import (
    ShardedTokens,
    TokenArray,
    TokenCache,
    fingerprint,
    load_token_cache,
)
from data.tokenizer_training import cached_tokenizer, check_vocab_size, given_tokenizer
from qwen3.tokenizer import Qwen3Tokenizer

# Bump when the ids a cache holds change for the same settings. 2: the train split ends at the
# document that reaches data.max_tokens (format 1 also kept val documents encoded beside it).
TOKEN_STREAM_VERSION = 2
log = logging.getLogger(__name__)
# With max_tokens set, the tokenizer reads about as much text as the cache will hold.
_BYTES_PER_TOKEN_BOUND = 8


@dataclass
class SourceData:
    """One source's splits as read-only arrays of token ids, with its cache.

    val_bytes is the UTF-8 size of the validation text; fingerprint names the token cache;
    meta is its meta.json (token and document counts, checksums, source spec).
    """

    label: str
    weight: float
    train: TokenArray
    val: np.ndarray
    val_bytes: int
    fingerprint: str
    cache_path: Path
    meta: dict[str, Any]


@dataclass
class PreparedData:
    """The tokenizer and every source's splits (one source, or a mixture's in its order).

    For one source, `train`, `val`, `fingerprint`, `cache_path` and `meta` are its own; for a
    mixture, `train` and `val` read all sources' tokens as one, and `fingerprint` names the
    whole mixture (caches and weights).
    """

    tokenizer: Qwen3Tokenizer
    tokenizer_dir: Path
    sources: list[SourceData]

    @property
    def is_mixture(self) -> bool:
        return len(self.sources) > 1

    @property
    def train(self) -> TokenArray:
        return (
            self.sources[0].train if not self.is_mixture else _joined(s.train for s in self.sources)
        )

    @property
    def val(self) -> TokenArray:
        return self.sources[0].val if not self.is_mixture else _joined(s.val for s in self.sources)

    @property
    def val_bytes(self) -> int:
        return sum(s.val_bytes for s in self.sources)

    @property
    def fingerprint(self) -> str:
        if not self.is_mixture:
            return self.sources[0].fingerprint
        return fingerprint([[s.label, s.weight, s.fingerprint] for s in self.sources])

    @property
    def cache_path(self) -> Path:
        return self.sources[0].cache_path

    @property
    def meta(self) -> dict[str, Any]:
        return self.sources[0].meta


def _joined(arrays: Iterable[TokenArray]) -> ShardedTokens:
    shards: list[np.ndarray] = []
    for a in arrays:
        shards.extend(a.shards if isinstance(a, ShardedTokens) else [a])
    return ShardedTokens(shards)


def _train_texts(cfg: DataConfig, docs: Iterable[tuple[bool, str]], budget: int) -> Iterator[str]:
    """Train-split text for the tokenizer trainer, up to `budget` bytes."""
    if cfg.max_tokens is not None:
        budget = min(budget, cfg.max_tokens * _BYTES_PER_TOKEN_BOUND)
    seen = 0
    for is_val, text in docs:
        if is_val:
            continue
        yield text
        seen += len(text.encode("utf-8"))
        if seen >= budget:
            return


def prepare_data(
    cfg: DataConfig,
    vocab_size: int,
    progress: bool = True,
    repair: bool = True,
    build: bool = True,
) -> PreparedData:
    """Tokenizer and token cache(s) for `cfg`, building what is missing.

    `vocab_size` is the model's; the tokenizer is trained with `cfg.vocab_size` or that.
    A second call with the same settings maps the finished caches and returns in well under
    a second. A killed cache build, run again, keeps its finished shards (:mod:`data.cache_build`).
    A mixture (`data.sources`) gets one cache per source and one tokenizer for all of them.
    `repair`: this process builds the caches, so it may delete a damaged one and build it anew;
    pass False in the others (under torchrun, every rank but 0): they fail instead of deleting
    files the builder may be using. With `build` False nothing is built: a missing tokenizer
    or cache raises :class:`DataNotReady` (see :func:`wait_for_data`).
    """
    train_vocab = cfg.vocab_size or vocab_size
    if train_vocab > vocab_size:
        raise DataError(
            f"data.vocab_size={cfg.vocab_size} exceeds the model's vocab_size={vocab_size}: "
            f"token ids would fall outside the embedding; lower data.vocab_size"
        )
    mixture = cfg.mixture() or [MixtureSource(default_label(cfg, 0), 1.0, cfg)]
    given = next((m.config.tokenizer for m in mixture if m.config.tokenizer), None)
    if not given:
        check_vocab_size(train_vocab, "data.vocab_size" if cfg.vocab_size else "model.vocab_size")
    sources = [_Source(m, source_spec(m.config)) for m in mixture]
    if given:
        tokenizer, tokenizer_dir = given_tokenizer(given, vocab_size)
    else:
        trained = _trained_tokenizer(cfg, train_vocab, sources, repair, build)
        if trained is None:
            raise DataNotReady(f"no tokenizer for {_describe(cfg)} in {cfg.cache_dir} yet")
        tokenizer, tokenizer_dir = trained
    prepared = [s.cache(tokenizer, tokenizer_dir, progress, repair, build) for s in sources]
    return PreparedData(tokenizer, tokenizer_dir, prepared)


class _Source:
    """One source on its way to a cache: its document stream is opened at most once."""

    def __init__(self, mix: MixtureSource, spec: dict[str, Any]) -> None:
        self.mix, self.cfg, self.spec = mix, mix.config, spec
        cfg = self.cfg
        # Asked of the hub only when something must be built, so a cached run works offline.
        self.own_validation = functools.cache(lambda: cfg.source == "hf" and hf_has_validation(cfg))
        self.stream = functools.cache(
            lambda: OnePass(split_documents(cfg, self.own_validation()), Path(cfg.cache_dir))
        )

    def key(self) -> dict[str, Any]:
        """What decides the tokenizer's sample from this source."""
        return {
            "source": self.spec,
            "split": _split_rule(self.cfg),
            "limits": {"max_docs": self.cfg.max_docs, "max_tokens": self.cfg.max_tokens},
        }

    def cache(
        self,
        tokenizer: Qwen3Tokenizer,
        tokenizer_dir: Path,
        progress: bool,
        repair: bool,
        build: bool,
    ) -> SourceData:
        cfg = self.cfg
        key = _cache_key(cfg, self.spec, tokenizer_dir, TOKEN_STREAM_VERSION)
        fp = fingerprint(key)
        path = Path(cfg.cache_dir) / f"tokens-{fp}"
        cache = load_token_cache(path, repair)
        if cache is None:
            cache, fp, path = _format1_cache(
                cfg, self.spec, tokenizer_dir, repair, build, (None, fp, path)
            )
        if cache is None and not build:
            raise DataNotReady(f"no finished token cache at {path} yet")
        if cache is None:
            phases: list[tuple[Iterable[tuple[bool, str]], bool]] = [(self.stream().whole(), False)]
            val_cap = None
            if self.own_validation():
                phases.append((((True, doc) for doc in validation_documents(cfg)), True))
                if cfg.max_tokens is not None:
                    val_cap = max(1, math.ceil(cfg.max_tokens * cfg.val_fraction))
            meta = {
                "fingerprint": fp,
                **key,
                "own_validation": self.own_validation(),
                "tokenizer_dir": str(tokenizer_dir),
            }
            cache = build_token_cache(
                path,
                tokenizer,
                phases,
                cfg.max_tokens,
                val_cap,
                meta,
                progress=progress,
                shard_tokens=cfg.shard_tokens,
                total_docs=_known_docs(cfg),
            )
        return SourceData(
            label=self.mix.label,
            weight=self.mix.weight,
            train=cache.train,
            val=cache.val,
            val_bytes=int(cache.meta["val_bytes"]),
            fingerprint=fp,
            cache_path=path,
            meta=cache.meta,
        )


def _trained_tokenizer(
    cfg: DataConfig, vocab_size: int, sources: list[_Source], repair: bool, build: bool
) -> tuple[Qwen3Tokenizer, Path] | None:
    """The tokenizer trained on the train split, or for a mixture on a sample of each source in
    proportion to its weight (`data.tokenizer_max_bytes` in all)."""
    if len(sources) == 1:
        key = sources[0].key()
    else:
        key = {"mixture": [{**s.key(), "weight": s.mix.weight} for s in sources]}
    total = sum(s.mix.weight for s in sources)

    def texts() -> Iterator[str]:
        for s in sources:
            budget = int(cfg.tokenizer_max_bytes * s.mix.weight / total)
            if budget > 0:
                yield from _train_texts(s.cfg, s.stream().head(), budget)

    empty = (
        f"{_describe(cfg)} yielded no training text (the source is empty, or every "
        f"document went to validation): add documents, or adjust data.val_docs / "
        f"data.val_fraction / data.max_docs"
    )
    key = {**key, "max_bytes": cfg.tokenizer_max_bytes}
    return cached_tokenizer(Path(cfg.cache_dir), key, vocab_size, texts, empty, repair, build)


class DataNotReady(Exception):
    """`prepare_data(build=False)` found the tokenizer or token cache not built yet."""


def wait_for_data(
    load: Callable[[], PreparedData], marker: Path, poll_seconds: float = 1.0
) -> PreparedData:
    """What another process (rank 0) is building, once it is there: ``load`` is
    ``prepare_data(..., build=False)``. The builder writes ``marker.done`` or ``marker.failed``
    (its one-line error) when it ends, so this never waits on a builder that has stopped, and
    never in a collective that could time out on a build of hours. A data error of our own
    counts only once the builder is done (until then it may be repairing what we read)."""
    said = False
    while True:
        try:
            return load()
        except DataNotReady:
            pass
        except DataError:
            if marker.with_suffix(".done").exists():
                raise
        failed = marker.with_suffix(".failed")
        if failed.exists():
            raise DataError(f"rank 0 failed preparing the data: {failed.read_text().strip()}")
        if not said:
            log.warning("waiting for rank 0 to build the tokenizer and token cache")
            said = True
        time.sleep(poll_seconds)


def _cache_key(
    cfg: DataConfig, spec: dict[str, Any], tokenizer_dir: Path, version: int
) -> dict[str, Any]:
    return {
        "format_version": version,
        "source": spec,
        "split": _split_rule(cfg),
        "limits": {"max_docs": cfg.max_docs, "max_tokens": cfg.max_tokens},
        "tokenizer_sha256": hashlib.sha256(
            (tokenizer_dir / "tokenizer.json").read_bytes()
        ).hexdigest(),
    }


def _format1_cache(
    cfg: DataConfig,
    spec: dict[str, Any],
    tokenizer_dir: Path,
    repair: bool,
    build: bool,
    missing: tuple[None, str, Path],
) -> tuple[TokenCache | None, str, Path]:
    """A cache of the same settings in format 1 (one train.bin), read where it holds the same
    ids; where it does not (a data.max_tokens cut), say in one line that it is rebuilt."""
    fp = fingerprint(_cache_key(cfg, spec, tokenizer_dir, 1))
    path = Path(cfg.cache_dir) / f"tokens-{fp}"
    if not path.is_dir():
        return missing
    if cfg.max_tokens is not None:
        if build:  # said once, by the builder, not at every poll of a waiting rank
            log.warning(
                "token cache %s is in format 1, whose data.max_tokens cut kept other val "
                "documents; building %s in the sharded format (delete the old one to free its "
                "space)",
                path,
                missing[2],
            )
        return missing
    old = load_token_cache(path, repair)
    return (old, fp, path) if old is not None else missing


def _known_docs(cfg: DataConfig) -> int | None:
    """How many documents the stream holds, where that is known without reading it."""
    if cfg.source == "shakespeare":
        return sum(1 for _ in split_documents(cfg, False))
    return cfg.max_docs


def _split_rule(cfg: DataConfig) -> dict[str, Any]:
    """Whether an hf dataset has its own validation split is implied by its path and name."""
    return {"val_docs": cfg.val_docs, "val_fraction": cfg.val_fraction}


def _describe(cfg: DataConfig) -> str:
    if cfg.source == "local":
        return f"data.paths={cfg.paths}"
    if cfg.source == "hf":
        return f"dataset {cfg.path!r} split {cfg.split!r}"
    return "the shakespeare corpus"
