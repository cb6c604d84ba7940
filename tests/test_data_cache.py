"""Token cache: shards that survive a SIGKILL, reading across shards, checksums, format 1."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from data import BatchSampler, val_batches
from data.cache_build import build_token_cache, partial_dir
from data.token_cache import ShardedTokens, load_token_cache, split_checksum
from data.tokenizer_training import train_tokenizer
from qwen3.tokenizer import Qwen3Tokenizer

REPO = Path(__file__).resolve().parents[1]
DOCS = [f"document number {i} says the king and the queen ran." for i in range(1500)]
SHARD = 500  # tokens: the 1500 documents make about 40 shards

# Builds a cache from a stream that stops after the first batch (1024 docs) is written as
# shards, tells the test, and waits to be killed. Its waits end with the process.
KILLED_BUILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from data.cache_build import build_token_cache, partial_dir
    from qwen3.tokenizer import Qwen3Tokenizer

    tok_dir, cache, signal_file, shard = sys.argv[1:5]
    docs = [f"document number {i} says the king and the queen ran." for i in range(1500)]

    def stream():
        for i, d in enumerate(docs):
            if i == 1100:  # the reader is past the first batch: wait until it is written
                while not (partial_dir(Path(cache)) / "shard-00010.json").exists():
                    time.sleep(0.01)
                Path(signal_file).write_text("stalled")
                time.sleep(3600)
            yield i % 20 == 0, d

    build_token_cache(Path(cache), Qwen3Tokenizer.from_dir(tok_dir), [(stream(), False)],
                      None, None, {}, progress=False, shard_tokens=int(shard))
    """
)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(DOCS[:200], 300)


def _docs():
    return [(i % 20 == 0, d) for i, d in enumerate(DOCS)]


def _build(path, tokenizer, docs=None, shard=SHARD, **kw):
    phases = [(docs if docs is not None else _docs(), False)]
    return build_token_cache(path, tokenizer, phases, None, None, {}, False, shard, **kw)


class CountingTokenizer(Qwen3Tokenizer):
    """The real tokenizer, counting the documents it is asked to encode."""

    encoded = 0

    def encode_batch(self, texts):
        type(self).encoded += len(texts)
        return super().encode_batch(texts)


def test_killed_build_resumes_from_its_shards(tokenizer, tmp_path) -> None:
    tok_dir, cache, flag = tmp_path / "tok", tmp_path / "cache" / "tokens-x", tmp_path / "flag"
    tokenizer.save(tok_dir)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [str(tok_dir), str(cache), str(flag), str(SHARD)]
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, *args], env=env)
    try:
        while not flag.exists():  # the build stalls there (not a timing assertion)
            assert proc.poll() is None, "the build subprocess exited before the stall point"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    work = partial_dir(cache)
    assert not cache.exists() and load_token_cache(cache) is None
    # the kill may land between a shard's rename and its record: only recorded shards count
    records = [json.loads(f.read_text()) for f in sorted(work.glob("shard-*.json"))]
    kept = {r["file"]: (work / r["file"]).stat() for r in records}
    assert len(kept) >= 11
    consumed = records[-1]["docs"]

    counting = CountingTokenizer.from_dir(tok_dir)
    resumed = _build(cache, counting)
    whole = _build(tmp_path / "other" / "tokens-x", tokenizer)
    assert resumed.meta["reused_shards"] == len(kept)
    for name, st in kept.items():  # the finished shards were kept, not written again
        now = (cache / name).stat()
        assert (now.st_ino, now.st_mtime_ns, now.st_size) == (st.st_ino, st.st_mtime_ns, st.st_size)
    assert CountingTokenizer.encoded == len(DOCS) - consumed  # consumed docs not re-encoded
    for key in (
        "train_sha256",
        "val_sha256",
        "train_tokens",
        "val_tokens",
        "train_docs",
        "val_docs",
        "val_bytes",
        "train_shards",
    ):
        assert resumed.meta[key] == whole.meta[key], key
    assert np.array_equal(np.asarray(resumed.train), np.asarray(whole.train))
    assert resumed.meta["train_sha256"] == split_checksum(resumed.train)
    assert not work.exists()


def test_error_during_build_keeps_finished_shards(tokenizer, tmp_path) -> None:
    cache = tmp_path / "tokens-y"

    def broken():
        yield from _docs()[:1100]
        raise RuntimeError("source went away")

    with pytest.raises(RuntimeError, match="source went away"):
        _build(cache, tokenizer, broken())
    assert not cache.exists() and len(list(partial_dir(cache).glob("shard-*.json"))) >= 11
    again = _build(cache, tokenizer)
    assert again.meta["reused_shards"] >= 11
    assert (
        again.meta["train_sha256"] == _build(tmp_path / "b" / "t", tokenizer).meta["train_sha256"]
    )


def test_shard_size_does_not_change_the_batches(tokenizer, tmp_path) -> None:
    many = _build(tmp_path / "many", tokenizer, shard=333)
    one = _build(tmp_path / "one", tokenizer, shard=10**9)
    assert isinstance(many.train, ShardedTokens) and len(many.meta["train_shards"]) > 30
    assert isinstance(one.train, np.memmap) and len(one.meta["train_shards"]) == 1
    assert many.meta["train_sha256"] == one.meta["train_sha256"]
    for rank in range(2):
        a = BatchSampler(many.train, 4, 64, seed=5, rank=rank, world_size=2)
        b = BatchSampler(one.train, 4, 64, seed=5, rank=rank, world_size=2)
        for step in range(30):  # windows across shard ends included
            assert all(
                np.array_equal(p, q) for p, q in zip(a.batch(step), b.batch(step), strict=True)
            )
    for (x, y), (u, v) in zip(
        val_batches(many.val, 2, 32, 3), val_batches(one.val, 2, 32, 3), strict=True
    ):
        assert np.array_equal(x, u) and np.array_equal(y, v)


def test_sharded_tokens_index_like_one_array() -> None:
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 1000, size=n).astype(np.uint16) for n in (7, 1, 30, 12)]
    whole, sharded = np.concatenate(parts), ShardedTokens(parts)
    assert len(sharded) == len(whole)
    index = rng.integers(0, len(whole), size=(5, 9))
    assert np.array_equal(sharded[index], whole[index])
    assert np.array_equal(sharded[3:41], whole[3:41]) and sharded[-1] == whole[-1]
    assert np.array_equal(np.asarray(sharded), whole)
    with pytest.raises(IndexError):
        sharded[np.array([len(whole)])]


def test_format1_cache_is_read(tokenizer, tmp_path) -> None:
    built = _build(tmp_path / "new", tokenizer, shard=10**9)
    old = tmp_path / "tokens-old"
    old.mkdir()
    (old / "train.bin").write_bytes(np.asarray(built.train).tobytes())
    (old / "val.bin").write_bytes(np.asarray(built.val).tobytes())
    meta = {k: built.meta[k] for k in ("dtype", "train_tokens", "val_tokens", "val_bytes")}
    (old / "meta.json").write_text(json.dumps({**meta, "format_version": 1}))
    read = load_token_cache(old)
    assert read is not None and np.array_equal(read.train, np.asarray(built.train))


def test_format_version_mismatch_is_rebuilt(tokenizer, tmp_path, caplog) -> None:
    cache = tmp_path / "tokens-z"
    built = _build(cache, tokenizer)
    meta = (cache / "meta.json").read_text().replace('"format_version": 2', '"format_version": 0')
    (cache / "meta.json").write_text(meta)
    assert load_token_cache(cache) is None and not cache.exists()
    assert "format version" in caplog.text
    again = _build(cache, tokenizer)
    assert np.array_equal(np.asarray(again.train), np.asarray(built.train))


def test_val_only_phase_and_caps(tokenizer, tmp_path) -> None:
    train = [(False, d) for d in DOCS[:100]]
    val = [(True, d) for d in DOCS[100:]]
    built = build_token_cache(
        tmp_path / "tokens-v", tokenizer, [(train, False), (val, True)], 300, 50, {}, False, 128
    )
    assert built.meta["train_tokens"] == 300 and len(built.meta["train_shards"]) == 3
    # val stops at the first whole document that reaches its cap
    assert 50 <= built.meta["val_tokens"] < 50 + 20 and built.meta["val_docs"] < 10


def test_second_builder_waits_for_the_first(tokenizer, tmp_path, caplog) -> None:
    cache = tmp_path / "tokens-l"
    work = partial_dir(cache)
    work.mkdir(parents=True)
    result: list[object] = []
    with open(work / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a `train.py prepare` still building would
        thread = threading.Thread(target=lambda: result.append(_build(cache, tokenizer)))
        thread.start()
        while "waiting for it" not in caplog.text:  # it ends only once the lock is free
            assert thread.is_alive(), "the second builder ended without waiting"
            time.sleep(0.02)
        assert not cache.exists()
    thread.join()
    assert len(result) == 1 and load_token_cache(cache) is not None
