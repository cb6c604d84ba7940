"""`prepare_data`: source -> tokenizer (trained or given) -> token cache, each cached by fingerprint."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data.atomic_dir import building, load_finished
from data.cache_build import build_token_cache
from data.config import DataConfig
from data.errors import DataError
from data.sources import hf_has_validation, source_spec, split_documents, validation_documents
from data.token_cache import TokenArray, TokenCache, fingerprint, load_token_cache
from data.tokenizer_training import check_tokenizer_fits, check_vocab_size, train_tokenizer
from qwen3.tokenizer import Qwen3Tokenizer

# Bump when tokenizer training changes its output for the same text.
TOKENIZER_TRAINING_VERSION = 1
# Bump when the ids a cache holds change for the same settings. 2: the train split ends at the
# document that reaches data.max_tokens (format 1 also kept val documents encoded beside it).
TOKEN_STREAM_VERSION = 2
log = logging.getLogger(__name__)
# With max_tokens set, the tokenizer reads about as much text as the cache will hold.
_BYTES_PER_TOKEN_BOUND = 8


@dataclass
class PreparedData:
    """A tokenizer plus both splits as read-only memmaps of token ids.

    val_bytes is the UTF-8 size of the validation text (for bits per byte); fingerprint
    names the token cache; meta is its meta.json (token and document counts, source spec).
    """

    tokenizer: Qwen3Tokenizer
    tokenizer_dir: Path
    train: TokenArray
    val: np.ndarray
    val_bytes: int
    fingerprint: str
    cache_path: Path
    meta: dict[str, Any]


class _OnePass:
    """The source's document stream, read once: what the tokenizer trainer takes from its
    start is kept in an unnamed temporary file (gone with the process, even after a kill) and
    replayed to the cache build, which then goes on with the rest of the same stream."""

    def __init__(self, docs: Iterator[tuple[bool, str]], cache_dir: Path) -> None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        self.docs = docs
        self.spill = tempfile.TemporaryFile("w+", encoding="utf-8", dir=cache_dir)  # noqa: SIM115

    def head(self) -> Iterator[tuple[bool, str]]:
        """Documents from the start, each written to the spill file as it is taken."""
        for item in self.docs:
            self.spill.write(json.dumps(item) + "\n")
            yield item

    def whole(self) -> Iterator[tuple[bool, str]]:
        """Every document: the spilled head again, then the rest of the stream."""
        self.spill.seek(0)
        for line in self.spill:
            is_val, text = json.loads(line)
            yield bool(is_val), str(text)
        self.spill.close()
        yield from self.docs


def _train_texts(cfg: DataConfig, docs: Iterable[tuple[bool, str]]) -> Iterator[str]:
    """Train-split text for the tokenizer trainer, up to its byte budget."""
    budget = cfg.tokenizer_max_bytes
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


def _read_tokenizer(path: Path) -> Qwen3Tokenizer:
    # Read the file first: an I/O error then surfaces as one (the tokenizers loader would turn
    # it into a parse error, which counts as damage).
    (path / "tokenizer.json").read_bytes()
    return Qwen3Tokenizer.from_dir(path)


def _trained_tokenizer(
    cfg: DataConfig,
    vocab_size: int,
    spec: dict[str, Any],
    docs: Callable[[], Iterator[tuple[bool, str]]],
    repair: bool,
    build: bool = True,
) -> tuple[Qwen3Tokenizer, Path] | None:
    """Train a tokenizer on the train split (of ``docs()``), or load the one trained before from
    the same inputs; None if there is none and not ``build``."""
    key = {
        "version": TOKENIZER_TRAINING_VERSION,
        "source": spec,
        "split": _split_rule(cfg),
        "limits": {"max_docs": cfg.max_docs, "max_tokens": cfg.max_tokens},
        "max_bytes": cfg.tokenizer_max_bytes,
        "vocab_size": vocab_size,
    }
    path = Path(cfg.cache_dir) / f"tokenizer-{vocab_size}-{fingerprint(key)}"
    cached = load_finished(path, _read_tokenizer, "tokenizer cache", "retraining", repair)
    if cached is not None or not build:
        return None if cached is None else (cached, path)
    texts = _train_texts(cfg, docs())
    first = next(texts, None)
    if first is None:
        raise DataError(
            f"{_describe(cfg)} yielded no training text (the source is empty, or every "
            f"document went to validation): add documents, or adjust data.val_docs / "
            f"data.val_fraction / data.max_docs"
        )
    tokenizer = train_tokenizer(_prepend(first, texts), vocab_size)
    with building(path) as tmp:
        tokenizer.save(tmp)
    # Reload what was published: if another rank won the race, every rank uses its files.
    return Qwen3Tokenizer.from_dir(path), path


def _given_tokenizer(cfg: DataConfig, vocab_size: int) -> tuple[Qwen3Tokenizer, Path]:
    path = Path(str(cfg.tokenizer)).expanduser()
    if not (path / "tokenizer.json").is_file():
        raise DataError(
            f"data.tokenizer={cfg.tokenizer!r} has no tokenizer.json: point it at a tokenizer "
            f"directory (e.g. a downloaded Qwen3 model), or set data.tokenizer=null to train one"
        )
    tokenizer = Qwen3Tokenizer.from_dir(path)
    check_tokenizer_fits(tokenizer, vocab_size, str(path))
    return tokenizer, path


def prepare_data(
    cfg: DataConfig,
    vocab_size: int,
    progress: bool = True,
    repair: bool = True,
    build: bool = True,
) -> PreparedData:
    """Tokenizer and token cache for `cfg`, building what is missing.

    `vocab_size` is the model's; the tokenizer is trained with `cfg.vocab_size` or that.
    A second call with the same settings maps the finished cache and returns in well under
    a second. A killed cache build, run again, keeps its finished shards (:mod:`data.cache_build`).
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
    if not cfg.tokenizer:
        check_vocab_size(train_vocab, "data.vocab_size" if cfg.vocab_size else "model.vocab_size")
    spec = source_spec(cfg)
    # Asked of the hub only when something must be built, so a cached run works offline.
    own_validation = functools.cache(lambda: cfg.source == "hf" and hf_has_validation(cfg))
    stream = functools.cache(lambda: _stream(cfg, own_validation()))
    if cfg.tokenizer:
        tokenizer, tokenizer_dir = _given_tokenizer(cfg, vocab_size)
    else:
        trained = _trained_tokenizer(cfg, train_vocab, spec, lambda: stream().head(), repair, build)
        if trained is None:
            raise DataNotReady(f"no tokenizer for {_describe(cfg)} in {cfg.cache_dir} yet")
        tokenizer, tokenizer_dir = trained
    key = _cache_key(cfg, spec, tokenizer_dir, TOKEN_STREAM_VERSION)
    fp = fingerprint(key)
    path = Path(cfg.cache_dir) / f"tokens-{fp}"
    cache = load_token_cache(path, repair)
    if cache is None:
        cache, fp, path = _format1_cache(cfg, spec, tokenizer_dir, repair, (cache, fp, path))
    if cache is None and not build:
        raise DataNotReady(f"no finished token cache at {path} yet")
    if cache is None:
        phases: list[tuple[Iterable[tuple[bool, str]], bool]] = [(stream().whole(), False)]
        val_cap = None
        if own_validation():
            phases.append((((True, doc) for doc in validation_documents(cfg)), True))
            if cfg.max_tokens is not None:
                val_cap = max(1, math.ceil(cfg.max_tokens * cfg.val_fraction))
        meta = {
            "fingerprint": fp,
            **key,
            "own_validation": own_validation(),
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
    return PreparedData(
        tokenizer=tokenizer,
        tokenizer_dir=tokenizer_dir,
        train=cache.train,
        val=cache.val,
        val_bytes=int(cache.meta["val_bytes"]),
        fingerprint=fp,
        cache_path=path,
        meta=cache.meta,
    )


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


def _stream(cfg: DataConfig, own_validation: bool) -> _OnePass:
    return _OnePass(split_documents(cfg, own_validation), Path(cfg.cache_dir))


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
    missing: tuple[None, str, Path],
) -> tuple[TokenCache | None, str, Path]:
    """A cache of the same settings in format 1 (one train.bin), read where it holds the same
    ids; where it does not (a data.max_tokens cut), say in one line that it is rebuilt."""
    fp = fingerprint(_cache_key(cfg, spec, tokenizer_dir, 1))
    path = Path(cfg.cache_dir) / f"tokens-{fp}"
    if not path.is_dir():
        return missing
    if cfg.max_tokens is not None:
        log.warning(
            "token cache %s is in format 1, whose data.max_tokens cut kept other val documents; "
            "building %s in the sharded format (delete the old one to free its space)",
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


def _prepend(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest
