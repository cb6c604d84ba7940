"""Helpers for the serve tests: a tiny real checkpoint and a real `serve.py` process on loopback.

(No tests here; the test_serve_*.py modules import these.)
"""

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
import torch
from tokenizers import pre_tokenizers, trainers

from qwen3 import Qwen3, Qwen3Config
from qwen3.tokenizer import Qwen3Tokenizer, build_bpe_pipeline, make_added_tokens

REPO_ROOT = Path(__file__).resolve().parents[1]

TEXT = """Once upon a time there was a little cat named Tom. Tom liked to play in the garden.
One day Tom saw a big red ball under the tree. He ran to the ball and pushed it with his nose.
The ball rolled down the hill, and Tom ran after it as fast as he could.
A girl named Lily found the ball by the river. She smiled and gave it back to Tom.
They played together all afternoon, and when the sun went down they were good friends.
The moon came up over the hill, and the stars were bright. Tom went home and slept well.
"""


def build_tiny_checkpoint(path: Path, max_positions: int = 256) -> Path:
    """A random tiny Qwen3 (hidden 64, 2 layers) with a small BPE tokenizer trained on TEXT."""
    special, think = make_added_tokens()
    tok = build_bpe_pipeline()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXT.splitlines() * 4, trainer=trainer)
    tok.add_tokens(think)
    tokenizer = Qwen3Tokenizer(tok)
    config = Qwen3Config(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=max_positions,
    )
    torch.manual_seed(0)
    Qwen3(config).save_pretrained(path)
    tokenizer.save(path)
    return path


def serve_command(*args: str) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "serve.py"), *args]


def run_serve(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    """Run serve.py to completion (for start-up errors); output captured as text."""
    return subprocess.run(
        serve_command(*args), cwd=cwd, capture_output=True, text=True, timeout=120
    )


@contextlib.contextmanager
def running_server(ckpt: Path, *extra: str) -> Iterator[str]:
    """Start serve.py on a free loopback port; yield its base URL; stop it afterwards."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        serve_command("--ckpt", str(ckpt), "--port", "0", "--log-level", "warning", *extra),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        url = _wait_for_url(proc)
        # Keep draining the server's output so a chatty log can never block it on a full pipe.
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        _wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for_url(proc: subprocess.Popen) -> str:
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        match = re.search(r"Open (http://\S+)/ ", line)
        if match:
            return match.group(1)
    raise RuntimeError("serve.py exited before serving:\n" + "".join(seen))


def _wait_healthy(url: str, proc: subprocess.Popen) -> None:
    while proc.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"serve.py exited with code {proc.returncode} before answering /health")
