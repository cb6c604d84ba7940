"""Shared test setup: offline hubs, deterministic torch, logging handlers kept from leaking
between tests, and the shared corpus path."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
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


_LOGGERS = ("", "lm_eval", "datasets")  # root (Hydra's job logging), and the libraries' own


@pytest.fixture(autouse=True)
def _no_stale_log_handlers() -> Iterator[None]:
    """An in-process run inside a test configures logging (Hydra's job logging gives the root
    logger a StreamHandler on the sys.stdout of that moment; lm-eval and datasets add theirs on
    sys.stderr): under pytest that is the test's captured stream, closed when the test ends, and
    a later test's warning would print '--- Logging error ---'. Handlers a test added are taken
    off again (pytest's own, from _pytest.logging, are left to pytest)."""
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    before = [(lg, list(lg.handlers), lg.propagate) for lg in loggers]
    yield
    for lg, handlers, propagate in before:
        for handler in list(lg.handlers):
            if handler not in handlers and type(handler).__module__ == "logging":
                lg.removeHandler(handler)
        lg.propagate = propagate
