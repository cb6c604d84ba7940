"""Shared test setup: offline hubs, deterministic torch, and the shared corpus path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing in the test suite may touch the network.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

torch.set_flush_denormal(True)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_CORPUS = REPO_ROOT.parent / "shared" / "corpora" / "tinystories-val-1k.txt"


@pytest.fixture
def tinystories_path() -> Path:
    """The real TinyStories sample beside the checkout; skips where ../shared is absent."""
    if not SHARED_CORPUS.exists():
        pytest.skip(
            f"shared corpus not found at {SHARED_CORPUS} (only present in the dev workspace)"
        )
    return SHARED_CORPUS
