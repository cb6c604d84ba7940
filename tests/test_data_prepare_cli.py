"""`train.py prepare`, then training that tokenizes nothing; and under torchrun, ranks that wait
for the cache rank 0 builds by polling its completion marker, not in a collective."""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_distributed_support import base_overrides
from test_trainer_support import (
    REPO,
    compose_run_config,
    read_metrics,
    run_train,
    small_run_overrides,
    subprocess_env,
    write_corpus,
)

from data import prepare_data
from data.cache_build import partial_dir


def _snapshot(cache: Path) -> dict[str, int]:
    return {
        str(p.relative_to(cache)): p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()
    }


@pytest.mark.slow  # ~30 s: two train.py processes
def test_prepare_then_train_tokenizes_nothing(tmp_path) -> None:
    corpus = write_corpus(tmp_path / "play.txt")
    base = [*small_run_overrides(tmp_path, corpus), "sample.max_new_tokens=0"]
    res = run_train(tmp_path, "prepare", *base, "data.shard_tokens=4000")
    assert res.returncode == 0, res.stderr
    cache = tmp_path / "cache"
    tokens_dir = next(cache.glob("tokens-*"))
    assert f"token cache: {tokens_dir}" in res.stdout
    assert "tokens/s" in res.stdout and "shards)" in res.stdout
    before = _snapshot(cache)

    res = run_train(tmp_path, *base, "trainer.max_steps=2", "run_name=after")
    assert res.returncode == 0, res.stderr
    assert "tokenizing" not in res.stderr + res.stdout  # no progress bar: nothing was encoded
    assert _snapshot(cache) == before  # no file written or rewritten
    assert len(read_metrics(tmp_path / "runs" / "after")) == 2


def test_prepare_refuses_a_bad_override_in_one_line(tmp_path) -> None:
    res = run_train(tmp_path, "prepare", "data.shard_token=5")
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "data.shard_token" in res.stderr and "data.shard_tokens" in res.stderr


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.mark.slow  # ~40 s: two processes start, wait, build and train
def test_torchrun_ranks_wait_for_the_cache_without_a_collective(tmp_path) -> None:
    """A `prepare` of the same cache is still running (we hold its build lock): rank 0 waits
    for that lock, rank 1 polls for rank 0's completion marker; once the lock is free rank 0
    builds and both train."""
    corpus = write_corpus(tmp_path / "play.txt")
    cache = tmp_path / "cache"
    args = [*base_overrides(tmp_path, corpus, cache), "run_name=waited", "trainer.max_steps=2"]
    cfg = compose_run_config(args)
    data = prepare_data(cfg.data, cfg.data.vocab_size or cfg.model.vocab_size, progress=False)
    shutil.rmtree(data.cache_path)  # the tokenizer stays; the token cache is to be built
    work = partial_dir(data.cache_path)
    work.mkdir()
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    with open(work / "lock", "w") as lock, open(out, "w") as o, open(err, "w") as e:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.Popen(
            [*cmd, str(REPO / "train.py"), *args],
            cwd=REPO,
            env=subprocess_env(tmp_path),
            stdout=o,
            stderr=e,
        )
        try:
            while "waiting for rank 0" not in _read(out) + _read(err):
                assert proc.poll() is None, _read(err)
                time.sleep(0.2)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    assert proc.wait() == 0, _read(err)  # the lock is free: rank 0 builds, both train
    logs = _read(out) + _read(err)
    assert "another process is building the token cache" in logs  # rank 0 waited for the lock
    assert len(read_metrics(tmp_path / "runs" / "waited")) == 2
    assert sorted(p.suffix for p in (cache / ".launches").iterdir()) == [".done"]
    assert data.cache_path.is_dir() and not work.exists()
