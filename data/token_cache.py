"""Token cache on disk: shards of train token ids, one val file, meta.json; and reading it.

A finished cache is a directory `tokens-<fingerprint>/` holding `train-00000.bin`,
`train-00001.bin`, ... (`data.shard_tokens` ids each, the last one shorter), `val.bin` and
`meta.json`, which lists the shards and a sha256 of each split's token stream (the ids in order,
as stored, whatever the sharding). Files hold raw little-endian ids (uint16 when the vocabulary
fits, else uint32), mapped with `np.memmap`. The train split reads as one array across its
shards (:class:`ShardedTokens`). The builder is :mod:`data.cache_build`.

Format 1 (one `train.bin` + `val.bin`, no checksums) is still read: for the same settings it
holds the same ids.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data.atomic_dir import load_finished

FORMAT_VERSION = 2
META = "meta.json"
VAL_FILE = "val.bin"
_V1_FILES = {"train": "train.bin", "val": "val.bin"}


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able object."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_name(index: int) -> str:
    return f"train-{index:05d}.bin"


class ShardedTokens:
    """Several token arrays read as their concatenation: `len()` and numpy indexing
    (an int, a slice, or an integer array of any shape) return what one array holding all
    the tokens would. Windows that cross a shard boundary are read from both shards."""

    def __init__(self, shards: list[np.ndarray]) -> None:
        if not shards:
            raise ValueError("ShardedTokens needs at least one shard")
        self.shards = shards
        self.bounds = np.cumsum([0] + [len(s) for s in shards])  # (S+1,) start of each shard
        self.dtype = shards[0].dtype

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def __getitem__(self, index: Any) -> Any:
        if len(self.shards) == 1:
            return self.shards[0][index]
        if isinstance(index, slice):
            index = np.arange(*index.indices(len(self)))
        scalar = np.ndim(index) == 0
        idx = np.asarray(index, dtype=np.int64)
        idx = np.where(idx < 0, idx + len(self), idx)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"token index out of range for {len(self)} tokens")
        which = np.searchsorted(self.bounds, idx, side="right") - 1
        out = np.empty(idx.shape, dtype=self.dtype)
        for s in np.unique(which):
            mask = which == s
            out[mask] = self.shards[s][idx[mask] - self.bounds[s]]
        return out[()] if scalar else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = np.concatenate([np.asarray(s) for s in self.shards])
        return whole if dtype is None else whole.astype(dtype)


# What a split is read as: one memmap, or the train shards as one.
TokenArray = np.ndarray | ShardedTokens


@dataclass
class TokenCache:
    """A finished cache directory: its metadata and read-only views of both splits."""

    path: Path
    meta: dict[str, Any]
    train: TokenArray
    val: np.ndarray


def load_token_cache(path: Path, repair: bool = True) -> TokenCache | None:
    """The cache at `path`, or None if absent. A damaged one is reported in one line and removed
    when `repair` (this process builds caches), else a DataError; an I/O error removes nothing
    (:func:`data.atomic_dir.load_finished`)."""
    return load_finished(path, _read_token_cache, "token cache", "rebuilding", repair)


def _memmap(file: Path, dtype: np.dtype, tokens: int) -> np.ndarray:
    expected = tokens * dtype.itemsize
    size = file.stat().st_size
    if size != expected or expected == 0:
        raise ValueError(f"{file.name} has {size} bytes, metadata says {expected}")
    return np.memmap(file, dtype=dtype, mode="r")


def _read_token_cache(path: Path) -> TokenCache:
    meta = json.loads((path / META).read_text())
    version = meta.get("format_version")
    dtype = np.dtype(meta["dtype"])
    if version == 1:
        one = _memmap(path / _V1_FILES["train"], dtype, meta["train_tokens"])
        return TokenCache(
            path, meta, one, _memmap(path / _V1_FILES["val"], dtype, meta["val_tokens"])
        )
    if version != FORMAT_VERSION:
        raise ValueError(f"format version {version} is not 1 or {FORMAT_VERSION}")
    shards = [_memmap(path / s["file"], dtype, s["tokens"]) for s in meta["train_shards"]]
    if sum(len(s) for s in shards) != meta["train_tokens"]:
        raise ValueError(f"the train shards do not add up to {meta['train_tokens']} tokens")
    val = _memmap(path / VAL_FILE, dtype, meta["val_tokens"])
    # one shard stays a plain memmap: the common case reads exactly as format 1 did
    train = shards[0] if len(shards) == 1 else ShardedTokens(shards)
    return TokenCache(path, meta, train, val)


def split_checksum(tokens: TokenArray, chunk: int = 1 << 24) -> str:
    """sha256 of a split's ids in order, as stored (what meta.json records)."""
    h = hashlib.sha256()
    for start in range(0, len(tokens), chunk):
        h.update(np.ascontiguousarray(tokens[start : start + chunk]).tobytes())
    return h.hexdigest()
