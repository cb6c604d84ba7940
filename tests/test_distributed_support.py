"""Shared helpers of the multi-process tests: run ``train.py`` under ``torchrun`` on CPU (gloo),
and the matching single-process reference in this process. (No tests in this module.)"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from test_trainer_support import (
    REPO,
    make_trainer,
    read_metrics,
    small_run_overrides,
    subprocess_env,
)

STEPS = 4
# A 2-process job here takes 10-60 s; one still running after this long is hung (a deadlock in
# a collective would otherwise wait out gloo's 30 min timeout and then CI's whole budget).
HANG_S = 600.0


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
        # float32 matmuls and Newton-Schulz: in bf16 (auto's choice on CPUs with native bf16) a
        # sharded or split batch rounds differently from one process's, 1e-5 to 2e-5 apart after
        # a few steps, above the 1e-5 the tests compare at
        "trainer.precision=fp32",
        "optim.ns_dtype=float32",
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
    return run_guarded(cmd, subprocess_env(tmp))


def run_worker(tmp: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2`` of the Python ``script`` (written to ``tmp``),
    with the repository importable; its first argument is ``tmp``, then ``args``."""
    path = tmp / "worker.py"
    path.write_text(script)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return run_guarded([*cmd, str(path), str(tmp), *args], {**os.environ, "PYTHONPATH": str(REPO)})


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (torchrun starts its workers in sessions of their own,
    so killing its process group would leave them running)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def run_guarded(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run a torchrun job from the repo root and capture its output. The output goes through
    files, not pipes: reading a pipe to its end would also wait on any stray grandchild that
    inherited it. A job still running after ``HANG_S`` is hung: every worker is made to print its
    Python stack (faulthandler, on SIGABRT) into the captured stderr, the job is killed, and the
    result fails with code -1, so the test's ``returncode == 0, stderr`` assertion shows where
    each rank waited."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env={**env, "PYTHONFAULTHANDLER": "1"}, stdout=out, stderr=err
        )
        try:
            code = proc.wait(timeout=HANG_S)
        except subprocess.TimeoutExpired:
            workers = process_tree(proc.pid)[1:]
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):  # ended meanwhile
                    os.kill(pid, signal.SIGABRT)
            time.sleep(5)  # the dumps reach torchrun's stderr; then nothing may outlive the test
            for pid in [proc.pid, *workers]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
            err.write(f"\nhung: still running after {HANG_S:.0f} s; stacks above (SIGABRT)")
            code = -1
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, code, out.read(), err.read())


def losses(run_dir: Path) -> list[float]:
    return [r["train_loss"] for r in read_metrics(run_dir)]


def single_process_losses(overrides: list[str], run_dir: Path) -> list[float]:
    """Train in this process (rank 0 of 1) and return the logged train losses."""
    make_trainer(overrides, run_dir).fit()
    return losses(run_dir)
