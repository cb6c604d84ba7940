"""Token cache: a build killed half way leaves nothing that passes for finished, and is redone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from data.atomic_dir import building
from data.token_cache import build_token_cache, load_token_cache
from data.tokenizer_training import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
DOCS = [f"document number {i} says the king and the queen ran." for i in range(1500)]

# Builds a cache from a stream that stalls (after one batch is written) until it is killed.
KILLED_BUILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from data.token_cache import build_token_cache
    from qwen3.tokenizer import Qwen3Tokenizer

    tok_dir, cache, signal_file = sys.argv[1:4]
    docs = [f"document number {i} says the king and the queen ran." for i in range(1500)]

    def stream():
        for i, d in enumerate(docs):
            if i == 1100:  # the first batch (1024 docs) is encoded and written by now
                Path(signal_file).write_text("stalled")
                time.sleep(3600)
            yield i % 20 == 0, d

    build_token_cache(Path(cache), Qwen3Tokenizer.from_dir(tok_dir), [(stream(), False)],
                      None, None, {}, progress=False)
    """
)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(DOCS[:200], 300)


def _docs():
    return [(i % 20 == 0, d) for i, d in enumerate(DOCS)]


def test_killed_build_leaves_nothing_finished_and_is_redone(tokenizer, tmp_path) -> None:
    tok_dir, cache, flag = tmp_path / "tok", tmp_path / "cache" / "tokens-x", tmp_path / "flag"
    tokenizer.save(tok_dir)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_BUILD, str(tok_dir), str(cache), str(flag)], env=env
    )
    try:
        while not flag.exists():  # wait for the stall point (not a timing assertion)
            assert proc.poll() is None, "the build subprocess exited before the stall point"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    leftovers = list(cache.parent.glob(".tmp-*"))
    assert len(leftovers) == 1 and (leftovers[0] / "train.bin").stat().st_size > 0
    assert not cache.exists() and load_token_cache(cache) is None

    built = build_token_cache(cache, tokenizer, [(_docs(), False)], None, None, {}, progress=False)
    assert not list(cache.parent.glob(".tmp-*"))  # the dead build's folder was removed
    assert built.meta["train_docs"] == 1425 and built.meta["val_docs"] == 75
    assert load_token_cache(cache) is not None


def test_error_during_build_removes_temporary(tokenizer, tmp_path) -> None:
    cache = tmp_path / "tokens-y"

    def broken():
        yield from _docs()[:10]
        raise RuntimeError("source went away")

    with pytest.raises(RuntimeError, match="source went away"):
        build_token_cache(cache, tokenizer, [(broken(), False)], None, None, {}, progress=False)
    assert not cache.exists() and not list(tmp_path.iterdir())


def test_second_publisher_keeps_the_first(tmp_path) -> None:
    final = tmp_path / "thing"
    with building(final) as tmp:
        (tmp / "a").write_text("first")
    with building(final) as tmp:
        (tmp / "a").write_text("second")
    assert (final / "a").read_text() == "first" and len(list(tmp_path.iterdir())) == 1


def test_format_version_mismatch_is_rebuilt(tokenizer, tmp_path, caplog) -> None:
    cache = tmp_path / "tokens-z"
    built = build_token_cache(cache, tokenizer, [(_docs(), False)], None, None, {}, progress=False)
    meta = (cache / "meta.json").read_text().replace('"format_version": 1', '"format_version": 0')
    (cache / "meta.json").write_text(meta)
    assert load_token_cache(cache) is None and not cache.exists()
    assert "format version" in caplog.text
    again = build_token_cache(cache, tokenizer, [(_docs(), False)], None, None, {}, progress=False)
    assert np.array_equal(np.array(again.train), np.array(built.train))


def test_val_only_phase_and_caps(tokenizer, tmp_path) -> None:
    train = [(False, d) for d in DOCS[:100]]
    val = [(True, d) for d in DOCS[100:]]
    built = build_token_cache(
        tmp_path / "tokens-v", tokenizer, [(train, False), (val, True)], 300, 50, {}, progress=False
    )
    assert built.meta["train_tokens"] == 300
    # val stops at the first whole document that reaches its cap
    assert 50 <= built.meta["val_tokens"] < 50 + 20 and built.meta["val_docs"] < 10
