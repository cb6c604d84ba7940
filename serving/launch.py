"""Run `serve.py` as a child process on a free loopback port (for benchmarks, tests and notebooks)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

SERVE_PY = Path(__file__).resolve().parents[1] / "serve.py"


@contextlib.contextmanager
def serve_in_subprocess(
    ckpt: str | Path, *extra_args: str, serve_py: Path = SERVE_PY
) -> Iterator[str]:
    """Start `serve.py --ckpt ckpt --port 0 ...`; yield its base URL once /health answers; stop it.
    ``serve_py``: another checkout's serve.py (a benchmark's baseline), run in its own folder."""
    with serve_process(ckpt, *extra_args, serve_py=serve_py) as (url, _):
        yield url


@contextlib.contextmanager
def serve_process(
    ckpt: str | Path, *extra_args: str, serve_py: Path = SERVE_PY
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """As `serve_in_subprocess`, yielding the process too (its pid, for memory figures)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            str(serve_py),
            "--ckpt",
            str(ckpt),
            "--port",
            "0",
            "--log-level",
            "warning",
            *extra_args,
        ],
        cwd=serve_py.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        url = _read_url(proc)
        # Keep draining the server's output so a chatty log can never block it on a full pipe.
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # type: ignore[union-attr]
        _wait_healthy(url, proc)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _read_url(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        match = re.search(r"Open (http://\S+)/ ", line)
        if match:
            return match.group(1)
    proc.wait()
    raise RuntimeError(
        f"serve.py exited with code {proc.returncode} before serving:\n" + "".join(seen)
    )


def _wait_healthy(url: str, proc: subprocess.Popen[str]) -> None:
    while proc.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"serve.py exited with code {proc.returncode} before answering /health")
