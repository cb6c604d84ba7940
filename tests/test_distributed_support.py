"""Shared helpers of the multi-process tests: run ``train.py`` under ``torchrun`` on CPU (gloo),
and the matching single-process reference in this process. (No tests in this module.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from test_trainer_support import (
    REPO,
    make_trainer,
    read_metrics,
    small_run_overrides,
    subprocess_env,
)

STEPS = 4


def base_overrides(tmp: Path, corpus: Path, cache_dir: Path) -> list[str]:
    """A few CPU steps of the small model; equal LR schedules for every world size."""
    return [
        *small_run_overrides(tmp, corpus, cache_dir),
        "trainer.device=cpu",
        f"trainer.max_steps={STEPS}",
        "trainer.eval_every=0",
        "trainer.save_every=2",
        "trainer.keep_last=5",
        "sample.max_new_tokens=0",
        # The tolerances below were set at this learning rate; Muon's default (1.2e-2) moves the
        # weights 4x further per step, and with them the bf16 Newton-Schulz rounding differences.
        "optim.lr=3e-3",
        "optim.adamw_lr=3e-3",
    ]


def run_torchrun(tmp: Path, nproc: int, *args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=NPROC train.py ARGS`` (a free port on
    127.0.0.1, chosen by torchrun's standalone rendezvous); captures output."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(REPO / "train.py"),
        *args,
    ]
    return subprocess.run(cmd, cwd=REPO, env=subprocess_env(tmp), capture_output=True, text=True)


def run_worker(tmp: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2`` of the Python ``script`` (written to ``tmp``),
    with the repository importable; its first argument is ``tmp``, then ``args``."""
    path = tmp / "worker.py"
    path.write_text(script)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.run(
        [*cmd, str(path), str(tmp), *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )


def losses(run_dir: Path) -> list[float]:
    return [r["train_loss"] for r in read_metrics(run_dir)]


def single_process_losses(overrides: list[str], run_dir: Path) -> list[float]:
    """Train in this process (rank 0 of 1) and return the logged train losses."""
    make_trainer(overrides, run_dir).fit()
    return losses(run_dir)
