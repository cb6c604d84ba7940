"""Time to first step: the wall time of a warm 1-step run (`python train.py trainer.max_steps=1`,
token cache and peak-FLOP/s cache already built) against the floor, `python -c "import torch"`,
alternating rounds, each timed by `/usr/bin/time -f %e`; medians and their ratio.

    .venv/bin/python benchmarks/bench_first_step.py                  # 5 rounds
    .venv/bin/python benchmarks/bench_first_step.py --against HEAD~3 # also that revision's run
    .venv/bin/python benchmarks/bench_first_step.py --quick          # 1 round, to check it runs

`--against REV` runs the same command from `git archive REV` (or from REV itself, a directory
holding another checkout), with the same virtualenv and token cache, so a change is measured
against what it replaced in one invocation. Each round runs every command
once, in turn; one untimed round first warms the caches. Runs go to a temporary `out_dir`.
The run keeps its defaults (evaluation, checkpoint, plot, samples, wandb as WANDB_MODE says).
Target: a warm 1-step run in at most 5 s (issue 19).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIME = shutil.which("time", path="/usr/bin")  # GNU time: the brief's measure, %e wall seconds


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    """Wall seconds of ``cmd`` (GNU time's %e when installed); its output is discarded unless
    it fails."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as out:
        full = [TIME, "-f", "%e", "-o", out.name, *cmd] if TIME else cmd
        t0 = time.perf_counter()
        res = subprocess.run(full, cwd=cwd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
        return float(out.read().split()[-1]) if TIME else wall


def checkout(rev: str, dest: Path) -> Path:
    """``rev``'s tracked files under ``dest`` (git archive: the working tree stays untouched)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", rev], cwd=REPO, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="one timed round")
    ap.add_argument("--threads", type=int, default=None, help="trainer.num_threads of the runs")
    ap.add_argument("--against", metavar="REV", help="also time the run of this git revision")
    ap.add_argument("overrides", nargs="*", help="extra train.py overrides for every run")
    args = ap.parse_args()
    rounds = 1 if args.quick else args.rounds

    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    tmp = Path(tempfile.mkdtemp(prefix="bench-first-step-"))
    run_args = [
        "train.py",
        "trainer.max_steps=1",
        f"data.cache_dir={REPO / '.cache' / 'data'}",  # one warm token cache for every side
        *([f"trainer.num_threads={args.threads}"] if args.threads else []),
        *args.overrides,
    ]
    py = sys.executable
    sides: dict[str, tuple[list[str], Path]] = {
        "python -c 'import torch'": ([py, "-c", "import torch"], REPO),
        "train.py trainer.max_steps=1": ([py, *run_args, f"out_dir={tmp / 'ours'}"], REPO),
    }
    if args.against:
        given = Path(args.against)
        old = given if given.is_dir() else checkout(args.against, tmp / "against")
        sides[f"the same at {args.against}"] = ([py, *run_args, f"out_dir={tmp / 'old'}"], old)
    try:
        for cmd, cwd in sides.values():  # warm-up: token cache, peak cache, page cache
            timed(cmd, cwd, env)
        times: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(rounds):
            for name, (cmd, cwd) in sides.items():
                times[name].append(timed(cmd, cwd, env))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    medians = {name: statistics.median(t) for name, t in times.items()}
    floor = times["python -c 'import torch'"]

    def ratio(num: list[float], den: list[float]) -> float:
        """Within each round, then the median over rounds: load that shifts between rounds
        moves both sides of a round alike."""
        return statistics.median(a / b for a, b in zip(num, den, strict=True))

    print(
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; "
        f"WANDB_MODE={os.environ.get('WANDB_MODE', '(unset)')}; {rounds} alternating rounds, "
        f"medians ({'/usr/bin/time -f %e' if TIME else 'perf_counter'})"
    )
    width = max(len(n) for n in sides)
    print(f"| {'command':<{width}} | median (s) | rounds (s) | ratio to import torch |")
    print(f"|{'-' * (width + 2)}|------------|------------|-----------------------|")
    for name, t in times.items():
        each = " ".join(f"{x:.2f}" for x in t)
        print(f"| {name:<{width}} | {medians[name]:10.2f} | {each} | {ratio(t, floor):.2f} |")
    if args.against:
        old, ours = times[f"the same at {args.against}"], times["train.py trainer.max_steps=1"]
        print(f"speed-up of the working tree over {args.against}: {ratio(old, ours):.2f}x")


if __name__ == "__main__":
    main()
