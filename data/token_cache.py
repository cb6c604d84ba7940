"""Token cache: train.bin / val.bin of token ids plus meta.json, complete-or-absent.

Documents are encoded in batches with the Rust tokenizer's parallel batch encoding, each
followed by <|endoftext|>. Files hold raw little-endian ids (uint16 when the vocabulary fits,
else uint32), so a cached run maps them with `np.memmap` in milliseconds.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm  # type: ignore[import-untyped]

from data.atomic_dir import building, load_finished
from data.errors import DataError
from qwen3.tokenizer import Qwen3Tokenizer

FORMAT_VERSION = 1
META = "meta.json"
SPLIT_FILES = {"train": "train.bin", "val": "val.bin"}
_BATCH_BYTES = 1 << 22  # text per parallel encode call: enough docs to keep every core busy
_BATCH_DOCS = 1024


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able object."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass
class TokenCache:
    """A finished cache directory: its metadata and read-only memmaps of both splits."""

    path: Path
    meta: dict[str, Any]
    train: np.ndarray
    val: np.ndarray


def load_token_cache(path: Path, repair: bool = True) -> TokenCache | None:
    """The cache at `path`, or None if absent. A damaged one is reported in one line and removed
    when `repair` (this process builds caches), else a DataError; an I/O error removes nothing
    (:func:`data.atomic_dir.load_finished`)."""
    return load_finished(path, _read_token_cache, "token cache", "rebuilding", repair)


def _read_token_cache(path: Path) -> TokenCache:
    meta = json.loads((path / META).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"format version {meta.get('format_version')} != {FORMAT_VERSION}")
    dtype = np.dtype(meta["dtype"])
    arrays = {}
    for split, name in SPLIT_FILES.items():
        file = path / name
        expected = meta[f"{split}_tokens"] * dtype.itemsize
        size = file.stat().st_size
        if size != expected or expected == 0:
            raise ValueError(f"{name} has {size} bytes, metadata says {expected}")
        arrays[split] = np.memmap(file, dtype=dtype, mode="r")
    return TokenCache(path, meta, arrays["train"], arrays["val"])


class _SplitWriter:
    """Appends documents' ids (+ EOS) to one split's file, up to an optional token cap."""

    def __init__(self, file: Path, dtype: np.dtype, eos_id: int, max_tokens: int | None):
        self.handle = open(file, "wb")  # noqa: SIM115  (closed by close())
        self.dtype, self.eos_id, self.max_tokens = dtype, eos_id, max_tokens
        self.tokens = self.docs = self.bytes = 0

    @property
    def full(self) -> bool:
        return self.max_tokens is not None and self.tokens >= self.max_tokens

    def add(self, ids: list[int], text: str, cut: bool) -> None:
        """Write one document; with `cut` the last document is truncated at the cap."""
        ids = [*ids, self.eos_id]
        if cut and self.max_tokens is not None:
            ids = ids[: self.max_tokens - self.tokens]
        self.handle.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self.tokens += len(ids)
        self.docs += 1
        self.bytes += len(text.encode("utf-8"))

    def close(self) -> None:
        self.handle.close()


def build_token_cache(
    path: Path,
    tokenizer: Qwen3Tokenizer,
    phases: Sequence[tuple[Iterable[tuple[bool, str]], bool]],
    max_tokens: int | None,
    val_max_tokens: int | None,
    meta: dict[str, Any],
    progress: bool = True,
) -> TokenCache:
    """Encode documents into a new cache at `path` and return it loaded.

    `phases` are (documents, val_only) pairs of (is_val, text) streams; a phase ends with its
    stream or once the split(s) it feeds are full (train at `max_tokens` tokens, cut exactly
    there; val at `val_max_tokens`, whole documents). Nothing is published unless both
    splits end up non-empty.
    """
    dtype = token_dtype(tokenizer.vocab_size)
    with building(path) as tmp:
        train = _SplitWriter(tmp / SPLIT_FILES["train"], dtype, tokenizer.eos_id, max_tokens)
        val = _SplitWriter(tmp / SPLIT_FILES["val"], dtype, tokenizer.eos_id, val_max_tokens)
        bar = tqdm(desc="tokenizing", unit="doc", disable=not progress, dynamic_ncols=True)
        start = time.perf_counter()
        try:
            for docs, val_only in phases:
                fed = val if val_only else train  # the phase ends when this split is full
                stream = iter(docs)
                while not fed.full:
                    batch = _next_batch(stream)
                    if not batch:
                        break
                    encoded = tokenizer.encode_batch([text for _, text in batch])
                    for (is_val, text), ids in zip(batch, encoded, strict=True):
                        writer = val if is_val else train
                        if not writer.full:
                            writer.add(ids, text, cut=not is_val)
                    bar.update(len(batch))
                    rate = (train.tokens + val.tokens) / max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix(tokens=train.tokens + val.tokens, tok_s=f"{rate:,.0f}")
        finally:
            bar.close()
            train.close()
            val.close()
        if train.tokens == 0 or val.tokens == 0:
            empty = "train" if train.tokens == 0 else "validation"
            raise DataError(
                f"the {empty} split is empty ({train.docs} train / {val.docs} val documents "
                f"with text): the source has too few documents; add text, or adjust "
                f"data.val_docs / data.val_fraction / data.max_docs"
            )
        meta = {
            **meta,
            "format_version": FORMAT_VERSION,
            "dtype": dtype.name,
            "train_tokens": train.tokens,
            "val_tokens": val.tokens,
            "train_docs": train.docs,
            "val_docs": val.docs,
            "val_bytes": val.bytes,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "build_seconds": round(time.perf_counter() - start, 3),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    cache = load_token_cache(path)
    assert cache is not None, f"token cache {path} vanished right after it was built"
    return cache


def _next_batch(docs: Iterator[tuple[bool, str]]) -> list[tuple[bool, str]]:
    """Up to _BATCH_BYTES of text / _BATCH_DOCS documents from the stream."""
    batch: list[tuple[bool, str]] = []
    size = 0
    for item in itertools.islice(docs, _BATCH_DOCS):
        batch.append(item)
        size += len(item[1])
        if size >= _BATCH_BYTES:
            break
    return batch
