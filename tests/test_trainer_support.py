"""Shared helpers of the trainer tests: a small corpus, small-model overrides, composing configs,
and running ``train.py`` as a real subprocess. (No tests in this module.)"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir

from qwen3 import Qwen3, Qwen3Config
from qwen3.tokenizer import Qwen3Tokenizer
from trainer.cli import CONF_DIR, register_resolvers
from trainer.config import RunConfig, build_run_config, register_config_nodes, to_container

REPO = Path(__file__).resolve().parents[1]

SMALL_MODEL = [
    "model.vocab_size=384",
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=2",
    "model.num_key_value_heads=1",
    "model.head_dim=32",
    "model.max_position_embeddings=128",
]

_NAMES = ["ROMEO", "JULIET", "MERCUTIO", "NURSE", "FRIAR"]
_WORDS = [
    "the",
    "a",
    "my",
    "thy",
    "good",
    "sweet",
    "night",
    "day",
    "love",
    "death",
    "fair",
    "heart",
    "hand",
    "lord",
    "lady",
    "come",
    "go",
    "speak",
    "hear",
    "see",
    "know",
    "tell",
    "stay",
    "fly",
    "swear",
    "kiss",
    "sword",
    "moon",
    "star",
    "light",
    "dark",
    "soul",
    "grave",
    "name",
    "rose",
    "and",
    "but",
    "o",
    "not",
    "so",
    "if",
    "then",
    "yet",
    "now",
    "here",
    "there",
    "with",
    "from",
    "upon",
]


def write_corpus(path: Path, n_docs: int = 300, seed: int = 0) -> Path:
    """A small play-shaped text corpus: documents of speaker lines, separated by blank lines."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        lines = []
        for _ in range(rng.randint(2, 5)):
            words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 10)))
            lines.append(f"{rng.choice(_NAMES)}:\n{words.capitalize()}.")
        docs.append("\n".join(lines))
    path.write_text("\n\n".join(docs) + "\n")
    return path


def small_run_overrides(tmp: Path, corpus: Path, cache_dir: Path | None = None) -> list[str]:
    """Overrides for a fast run on ``corpus`` with the small model, writing under ``tmp``."""
    return [
        *SMALL_MODEL,
        "data=local",
        f"data.paths=[{corpus}]",
        f"data.cache_dir={cache_dir or tmp / 'cache'}",
        f"out_dir={tmp / 'runs'}",
        "trainer.batch_size=4",
        "trainer.seq_len=32",
        "trainer.eval_batches=2",
        "trainer.log_every=1",
        "trainer.peak_flops=1e11",
        "trainer.num_threads=1",  # tiny matmuls: thread hand-offs cost more than they save
        "optim.warmup_steps=2",
        "wandb.mode=disabled",
        "sample.max_new_tokens=8",
    ]


def compose_config_dict(overrides: list[str]) -> dict[str, Any]:
    """The composed config ``train.py`` would convert, as plain values (Hydra compose API)."""
    register_resolvers()
    register_config_nodes()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return to_container(cfg)


def compose_run_config(overrides: list[str]) -> RunConfig:
    """The typed config ``train.py`` would build from these overrides."""
    return build_run_config(compose_config_dict(overrides))


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *args]


def subprocess_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(WANDB_DIR=str(tmp / "wandb-dir"), WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    return env


def run_train(tmp: Path, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` from the repo root; captures output."""
    return subprocess.run(
        train_cmd(*args),
        cwd=REPO,
        env=subprocess_env(tmp),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def make_trainer(overrides: list[str], run_dir: Path, wandb=None):
    """A :class:`trainer.loop.Trainer` built exactly as ``train.py`` builds one (in process)."""
    from trainer.build import apply_runtime_settings, build_parts, resolve_device
    from trainer.distributed import DistInfo
    from trainer.loop import Trainer

    cfg = compose_run_config(overrides)
    device, precision = resolve_device(cfg)
    apply_runtime_settings(cfg, device)
    parts = build_parts(cfg, DistInfo(), device, precision)
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, parts, run_dir, DistInfo(), "seed: 0\n", wandb, 1e11)


def tiny_qwen3(tokenizer: Qwen3Tokenizer, max_positions: int = 64, seed: int = 0) -> Qwen3:
    """A seeded random Qwen3 of the shape the CLI and checkpoint tests share (hidden 64, 2
    layers, grouped-query attention) over ``tokenizer``'s vocabulary."""
    torch.manual_seed(seed)
    return Qwen3(
        Qwen3Config(
            vocab_size=tokenizer.vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            max_position_embeddings=max_positions,
            eos_token_id=tokenizer.eos_id,
        )
    )
