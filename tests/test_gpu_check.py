"""benchmarks/gpu_check.py --dry-run: every row of the GPU check runs on CPU at toy sizes and
passes, so the script a GPU owner runs first is known to work up to the device itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROWS = [
    "train fp32 small (toy shape), ",  # eager, then compiled
    "train fp32 125M (toy shape), ",
    "fp16 + GradScaler",
    "train.py one process: 1 step, save, resume",
    "train.py DDP, 2 processes, gloo: 1 step, save, resume",
    "train.py FSDP, 2 processes, gloo: 1 step, save, resume",
    "evaluation, vocabulary 151,936",
    "trainer.activation_checkpointing=none",
    "trainer.activation_checkpointing=full",
    "greedy 32 tokens x 4 prompts, cpu fp32 == cpu fp32",
    "decode float32, batch 1,",
    "decode float32, batch 8,",
]


@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_row(tmp_path) -> None:
    res = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "TMPDIR": str(tmp_path)},
    )
    table = [line for line in res.stdout.splitlines() if line.startswith("| ")][1:]
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert len(table) == 14  # 4 throughput rows, fp16, 3 torchrun, eval, 2 checkpointing, 3 gen
    for row in ROWS:
        assert any(row in line for line in table), row
    assert all(line.rstrip().endswith("| ok |") for line in table), "\n".join(table)
    assert sum("compiled (aot_eager)" in line for line in table) == 2


def test_gpu_check_without_a_gpu_says_to_use_dry_run() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    res = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "--dry-run" in res.stderr
