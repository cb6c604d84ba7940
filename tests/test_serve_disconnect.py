"""Clients that hang up mid-stream free their rows: a real server under concurrent streaming
clients, a third of them disconnecting (the load of benchmarks/bench_serve_disconnect.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from test_serve_support import build_tiny_checkpoint

from benchmarks.bench_serve_disconnect import one_round
from serving.launch import serve_in_subprocess

CLIENTS = 12
MAX_TOKENS = 400


def test_hung_up_clients_free_their_rows(tmp_path: Path) -> None:
    ckpt = build_tiny_checkpoint(tmp_path / "tiny-model", 1024)
    # --max-batch-size 4: most clients wait for a row, so hang-ups happen both while waiting
    # and while decoding.
    with serve_in_subprocess(ckpt, "--max-batch-size", "4", "--threads", "1") as url:
        before = httpx.get(f"{url}/health").json()
        r = asyncio.run(one_round(url, CLIENTS, MAX_TOKENS, every=3, seed=0))
        after = httpx.get(f"{url}/health").json()
    assert r.hung_up == CLIENTS // 3 and r.short == 0
    assert r.finished == CLIENTS - CLIENTS // 3
    assert after["running"] == after["waiting"] == 0
    assert after["cancelled"] - before["cancelled"] == r.hung_up
    assert after["completed"] - before["completed"] == r.finished
    # Hung-up rows stopped early: each client hangs up within half its tokens, and its row must
    # leave well before the end (a quarter of the tokens' slack for the hang-up to be noticed).
    generated = after["generated_tokens"] - before["generated_tokens"]
    assert generated <= r.finished * MAX_TOKENS + r.hung_up * MAX_TOKENS * 3 // 4


@pytest.mark.slow
def test_bench_serve_disconnect_quick_passes() -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_serve_disconnect.py"
    res = subprocess.run(
        [sys.executable, str(script), "--quick", "--threads", "1"],
        capture_output=True,
        text=True,
        cwd=script.parents[1],
    )
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert "PASS" in res.stdout and "hung up" in res.stdout
