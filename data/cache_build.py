"""Building a token cache that survives a kill: shards, each complete-or-absent on its own.

The build works in `.partial-tokens-<fingerprint>/` beside the final directory. Each train shard
is written as `train-NNNNN.bin.partial`, renamed when it holds `shard_tokens` ids, and then
recorded in `shard-NNNNN.json`: the shard's sha256 and where the document stream stood after it
(documents consumed, plus how many ids of a document cut by the shard end were written), with
the length of `val.bin` at that point. Run again after a kill, the build keeps the recorded
shards, cuts `val.bin` back to the last record, skips the consumed documents without encoding
them and goes on, so the result equals an uninterrupted build id for id. The finished directory
is renamed into place (:mod:`data.token_cache` reads it).

Documents come encoded from :func:`data.encode_pipeline.encoded_batches`, which keeps the Rust
tokenizer busy while this thread writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from tqdm import tqdm  # type: ignore[import-untyped]

from data.atomic_dir import remove_stale_builds
from data.encode_pipeline import Batch, encoded_batches
from data.errors import DataError
from data.token_cache import (
    FORMAT_VERSION,
    META,
    VAL_FILE,
    TokenCache,
    load_token_cache,
    shard_name,
    split_checksum,
    token_dtype,
)
from qwen3.tokenizer import Qwen3Tokenizer

PARTIAL_PREFIX = ".partial-"
log = logging.getLogger(__name__)
_WRITE_BUFFER = 1 << 20

_SHARD_KEYS = ("file", "tokens", "sha256")  # of the shard; the rest says where the stream stands


def partial_dir(path: Path) -> Path:
    return path.parent / f"{PARTIAL_PREFIX}{path.name}"


def _write_json(file: Path, obj: Any) -> None:
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, file)


@contextlib.contextmanager
def _build_lock(work: Path) -> Iterator[None]:
    """One builder per cache; a second one (a `train.py prepare` still running, another job)
    waits for it. The lock dies with its process, so a kill never leaves it held."""
    with open(work / "lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another process is building the token cache in %s; waiting for it", work)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


class _Writer:
    """Routes encoded documents to the train shards and val.bin, and records each shard."""

    def __init__(
        self,
        work: Path,
        tokenizer: Qwen3Tokenizer,
        shard_tokens: int,
        max_tokens: int | None,
        val_max_tokens: int | None,
    ) -> None:
        self.work, self.eos = work, tokenizer.eos_id
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.shard_tokens, self.max_tokens, self.val_max = shard_tokens, max_tokens, val_max_tokens
        self.records = self._finished_records()
        last: dict[str, Any] = self.records[-1] if self.records else {}
        self.reused = len(self.records)
        self.docs, self.carry = last.get("docs", 0), last.get("carry", 0)
        self.train_docs = last.get("train_docs", 0)
        self.val_tokens, self.val_docs = last.get("val_tokens", 0), last.get("val_docs", 0)
        self.val_bytes, self.seconds = last.get("val_bytes", 0), last.get("seconds", 0.0)
        self.final = bool(last.get("final", False))
        self.train_hash = hashlib.sha256()
        for rec in self.records:  # the stream checksum goes on from the kept shards
            self.train_hash.update((work / rec["file"]).read_bytes())
        self.train_tokens = sum(r["tokens"] for r in self.records)
        self.val: IO[bytes] = open(work / VAL_FILE, "ab", buffering=_WRITE_BUFFER)  # noqa: SIM115
        self.val.truncate(self.val_tokens * self.dtype.itemsize)
        self.shard: IO[bytes] | None = None
        self.shard_hash = hashlib.sha256()
        self.shard_fill = 0

    def _finished_records(self) -> list[dict[str, Any]]:
        """The shard records a kill left intact, in order; everything after them is removed."""
        records: list[dict[str, Any]] = []
        while True:
            rec_file = self.work / f"shard-{len(records):05d}.json"
            try:
                rec = json.loads(rec_file.read_text())
                size = (self.work / rec["file"]).stat().st_size
            except (OSError, ValueError, KeyError):
                break
            if size != rec["tokens"] * self.dtype.itemsize:
                break
            records.append(rec)
            if rec.get("final"):
                break
        val_size = (self.work / VAL_FILE).stat().st_size if (self.work / VAL_FILE).exists() else 0
        if records and val_size < records[-1]["val_tokens"] * self.dtype.itemsize:
            records = []  # val.bin is shorter than recorded: nothing after it can be trusted
        keep = {r["file"] for r in records} | {f"shard-{i:05d}.json" for i in range(len(records))}
        for file in self.work.glob("*"):
            if file.name.startswith(("train-", "shard-")) and file.name not in keep:
                file.unlink()
        return records

    @property
    def train_full(self) -> bool:
        return self.max_tokens is not None and self.train_tokens >= self.max_tokens

    @property
    def val_full(self) -> bool:
        return self.val_max is not None and self.val_tokens >= self.val_max

    def add_batch(self, batch: Batch, ids: list[list[int]]) -> bool:
        """Write one encoded batch in stream order; True once the train split is full."""
        lengths = np.fromiter((len(i) + 1 for i in ids), dtype=np.int64, count=len(ids))
        ends = np.cumsum(lengths)
        flat = np.empty(int(ends[-1]), dtype=self.dtype)  # every document, each + <|endoftext|>
        body = np.ones(len(flat), dtype=bool)
        body[ends - 1] = False
        flat[ends - 1] = self.eos
        flat[body] = np.fromiter(
            itertools.chain.from_iterable(ids), self.dtype, len(flat) - len(ids)
        )
        for (index, is_val, text), end, length in zip(batch, ends, lengths, strict=True):
            doc = flat[end - length : end]
            if is_val:
                if not self.val_full:
                    self.val.write(doc.tobytes())
                    self.val_tokens += len(doc)
                    self.val_docs += 1
                    self.val_bytes += len(text.encode("utf-8"))
            elif self._add_train(index, doc):
                return True
            self.docs, self.carry = index + 1, 0
        return False

    def _add_train(self, index: int, doc: np.ndarray) -> bool:
        done = self.carry if index == self.docs else 0  # ids of it already in a kept shard
        if done == 0:
            self.train_docs += 1
        doc = doc[done:]
        if self.max_tokens is not None:
            doc = doc[: self.max_tokens - self.train_tokens]
        while len(doc):
            if self.shard is None:
                file = self.work / (shard_name(len(self.records)) + ".partial")
                self.shard = open(file, "wb", buffering=_WRITE_BUFFER)  # noqa: SIM115
            piece, doc = (
                doc[: self.shard_tokens - self.shard_fill],
                doc[self.shard_tokens - self.shard_fill :],
            )
            data = piece.tobytes()
            self.shard.write(data)
            self.shard_hash.update(data)
            self.train_hash.update(data)
            self.shard_fill += len(piece)
            self.train_tokens += len(piece)
            done += len(piece)
            if self.shard_fill == self.shard_tokens and not self.train_full:
                whole = not len(doc)
                self.close_shard(index + 1 if whole else index, 0 if whole else done, final=False)
        return self.train_full

    def close_shard(self, docs: int, carry: int, final: bool) -> None:
        """Publish the open shard and record where the stream stands after it."""
        index = len(self.records)
        if self.shard is not None:
            self.shard.flush()
            os.fsync(self.shard.fileno())
            self.shard.close()
            self.shard = None
            os.replace(self.work / (shard_name(index) + ".partial"), self.work / shard_name(index))
        elif not final:
            return
        self.val.flush()
        os.fsync(self.val.fileno())
        rec = {
            "file": shard_name(index),
            "tokens": self.shard_fill,
            "sha256": self.shard_hash.hexdigest(),
            "docs": docs,
            "carry": carry,
            "train_docs": self.train_docs,
            "val_tokens": self.val_tokens,
            "val_docs": self.val_docs,
            "val_bytes": self.val_bytes,
            "seconds": self.seconds,
            "final": final,
        }
        if self.shard_fill:
            _write_json(self.work / f"shard-{index:05d}.json", rec)
            self.records.append(rec)
        elif self.records:  # the stream ended right at a shard end: the last one says so
            self.records[-1].update({k: v for k, v in rec.items() if k not in _SHARD_KEYS})
            _write_json(self.work / f"shard-{index - 1:05d}.json", self.records[-1])
        self.shard_hash, self.shard_fill = hashlib.sha256(), 0
        self.final = final

    def close(self) -> None:
        if self.shard is not None:
            self.shard.close()
        self.val.close()


def build_token_cache(
    path: Path,
    tokenizer: Qwen3Tokenizer,
    phases: Sequence[tuple[Iterable[tuple[bool, str]], bool]],
    max_tokens: int | None,
    val_max_tokens: int | None,
    meta: dict[str, Any],
    progress: bool = True,
    shard_tokens: int = 250_000_000,
    total_docs: int | None = None,
) -> TokenCache:
    """Encode documents into the cache at `path` (resuming a killed build) and return it loaded.

    `phases` are (documents, val_only) pairs of (is_val, text) streams. The first phase feeds
    both splits and resumes shard by shard; it ends with its stream or where train reaches
    `max_tokens` ids (cut exactly there). A val-only phase (a source's own validation split)
    is redone after a kill; it stops after the document that reaches `val_max_tokens`.
    Nothing is published unless both splits end up non-empty. `total_docs`, when known, gives
    the progress bar its ETA.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(path)  # format-1 builds' temporary folders
    work = partial_dir(path)
    work.mkdir(exist_ok=True)
    with _build_lock(work):
        done = load_token_cache(path)
        if done is not None:  # another process finished it while we waited for nothing
            return done
        writer = _Writer(work, tokenizer, shard_tokens, max_tokens, val_max_tokens)
        start = time.perf_counter() - writer.seconds
        bar = tqdm(
            desc="tokenizing",
            unit="doc",
            total=total_docs,
            initial=writer.docs,
            disable=not progress,
            dynamic_ncols=True,
        )
        try:
            for number, (docs, val_only) in enumerate(phases):
                if number == 0 and writer.final:
                    continue  # the first phase finished before the kill
                skip = writer.docs if number == 0 else 0
                for batch, ids in encoded_batches(docs, skip, tokenizer):
                    full = writer.add_batch(batch, ids)
                    writer.seconds = time.perf_counter() - start
                    bar.update(len(batch))
                    tokens = writer.train_tokens + writer.val_tokens
                    bar.set_postfix(
                        tokens=f"{tokens:,}", tok_s=f"{tokens / max(writer.seconds, 1e-9):,.0f}"
                    )
                    if full or (val_only and writer.val_full):
                        break
                if number == 0:
                    writer.close_shard(writer.docs, writer.carry, final=True)
        finally:
            bar.close()
            writer.close()
        if writer.train_tokens == 0 or writer.val_tokens == 0:
            empty = "train" if writer.train_tokens == 0 else "validation"
            shutil.rmtree(work, ignore_errors=True)
            raise DataError(
                f"the {empty} split is empty ({writer.train_docs} train / {writer.val_docs} val "
                f"documents with text): the source has too few documents; add text, or adjust "
                f"data.val_docs / data.val_fraction / data.max_docs"
            )
        dtype = writer.dtype
        val = np.memmap(work / VAL_FILE, dtype=dtype, mode="r")
        meta = {
            **meta,
            "format_version": FORMAT_VERSION,
            "dtype": dtype.name,
            "shard_tokens": shard_tokens,
            "train_shards": [
                {"file": r["file"], "tokens": r["tokens"], "sha256": r["sha256"]}
                for r in writer.records
            ],
            "train_tokens": writer.train_tokens,
            "val_tokens": writer.val_tokens,
            "train_docs": writer.train_docs,
            "val_docs": writer.val_docs,
            "val_bytes": writer.val_bytes,
            "train_sha256": writer.train_hash.hexdigest(),
            "val_sha256": split_checksum(val),
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "build_seconds": round(time.perf_counter() - start, 3),
            "reused_shards": writer.reused,
        }
        del val
        (work / META).write_text(json.dumps(meta, indent=2) + "\n")
        for file in [work / "lock", *work.glob("shard-*.json")]:
            file.unlink()
        os.rename(work, path)
    cache = load_token_cache(path)
    assert cache is not None, f"token cache {path} vanished right after it was built"
    return cache
