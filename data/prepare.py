"""`prepare_data`: source -> tokenizer (trained or given) -> token cache, each cached by fingerprint."""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data.atomic_dir import building, load_finished
from data.config import DataConfig
from data.errors import DataError
from data.sources import hf_has_validation, source_spec, split_documents, validation_documents
from data.token_cache import FORMAT_VERSION, build_token_cache, fingerprint, load_token_cache
from data.tokenizer_training import check_tokenizer_fits, check_vocab_size, train_tokenizer
from qwen3.tokenizer import Qwen3Tokenizer

# Bump when tokenizer training changes its output for the same text.
TOKENIZER_TRAINING_VERSION = 1
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
    train: np.ndarray
    val: np.ndarray
    val_bytes: int
    fingerprint: str
    cache_path: Path
    meta: dict[str, Any]


def _train_texts(cfg: DataConfig, own_validation: bool) -> Iterator[str]:
    """Train-split text for the tokenizer trainer, up to its byte budget."""
    budget = cfg.tokenizer_max_bytes
    if cfg.max_tokens is not None:
        budget = min(budget, cfg.max_tokens * _BYTES_PER_TOKEN_BOUND)
    seen = 0
    for is_val, text in split_documents(cfg, own_validation):
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
    own_validation: Callable[[], bool],
    repair: bool,
) -> tuple[Qwen3Tokenizer, Path]:
    """Train a tokenizer on the train split, or load the one trained before from the same inputs."""
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
    if cached is not None:
        return cached, path
    texts = _train_texts(cfg, own_validation())
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
    cfg: DataConfig, vocab_size: int, progress: bool = True, repair: bool = True
) -> PreparedData:
    """Tokenizer and token cache for `cfg`, building what is missing.

    `vocab_size` is the model's; the tokenizer is trained with `cfg.vocab_size` or that.
    A second call with the same settings maps the finished cache and returns in well under
    a second. Builds are complete-or-absent, so an interrupted one is simply redone.
    `repair`: this process builds the caches, so it may delete a damaged one and build it anew;
    pass False in the others (under torchrun, every rank but 0): they fail instead of deleting
    files the builder may be using.
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
    if cfg.tokenizer:
        tokenizer, tokenizer_dir = _given_tokenizer(cfg, vocab_size)
    else:
        tokenizer, tokenizer_dir = _trained_tokenizer(
            cfg, train_vocab, spec, own_validation, repair
        )
    key = {
        "format_version": FORMAT_VERSION,
        "source": spec,
        "split": _split_rule(cfg),
        "limits": {"max_docs": cfg.max_docs, "max_tokens": cfg.max_tokens},
        "tokenizer_sha256": hashlib.sha256(
            (tokenizer_dir / "tokenizer.json").read_bytes()
        ).hexdigest(),
    }
    fp = fingerprint(key)
    path = Path(cfg.cache_dir) / f"tokens-{fp}"
    cache = load_token_cache(path, repair)
    if cache is None:
        phases: list[tuple[Iterator[tuple[bool, str]], bool]] = [
            (split_documents(cfg, own_validation()), False)
        ]
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
            path, tokenizer, phases, cfg.max_tokens, val_cap, meta, progress=progress
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
