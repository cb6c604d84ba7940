"""Helpers for the serve tests: a tiny real checkpoint, and serve.py run to completion.

(No tests here; the test_serve_*.py modules import these.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from data.tokenizer_training import train_tokenizer
from qwen3 import Qwen3, Qwen3Config
from serving.launch import SERVE_PY

TEXT = """Once upon a time there was a little cat named Tom. Tom liked to play in the garden.
One day Tom saw a big red ball under the tree. He ran to the ball and pushed it with his nose.
The ball rolled down the hill, and Tom ran after it as fast as he could.
A girl named Lily found the ball by the river. She smiled and gave it back to Tom.
They played together all afternoon, and when the sun went down they were good friends.
The moon came up over the hill, and the stars were bright. Tom went home and slept well.
"""


def build_tiny_checkpoint(path: Path, max_positions: int = 256) -> Path:
    """A random tiny Qwen3 (hidden 64, 2 layers) with a small BPE tokenizer trained on TEXT."""
    tokenizer = train_tokenizer(TEXT.splitlines() * 4, vocab_size=320)
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


def run_serve(*args: str) -> subprocess.CompletedProcess:
    """Run serve.py to completion (for start-up errors); output captured as text."""
    return subprocess.run(
        [sys.executable, str(SERVE_PY), *args],
        cwd=SERVE_PY.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
