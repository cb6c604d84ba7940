"""glibc's ``malloc`` as it comes against the trainer's setting for CPU runs without FSDP
(``trainer.build.retain_freed_memory``: no block gets its own mapping, the heap is never
trimmed), on our training step (Muon + AdamW, as the main job).

The setting is process-wide, so each side runs in a fresh worker process (this script with
``--worker``), one after the other in alternating rounds. Reported per side: wall seconds per
step, page faults and system CPU seconds per step (the kernel's cost of handing out and zeroing
pages again), peak RSS (what keeping freed memory costs), and the ratio of step times.

    .venv/bin/python benchmarks/bench_cpu_allocator.py                  # tiny and 100m
    .venv/bin/python benchmarks/bench_cpu_allocator.py --shapes tiny --rounds 5
    .venv/bin/python benchmarks/bench_cpu_allocator.py --amp     # bf16 autocast (auto on CPUs
                                                                 # with native bf16 matmuls)
    .venv/bin/python benchmarks/bench_cpu_allocator.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import harness
import torch

from qwen3 import Qwen3
from trainer.build import retain_freed_memory

SHAPES = {"tiny": (16, 256), "100m": (4, 256)}
SIDES = ("glibc default", "retained")


def worker(side: str, shape: str, steps: int, seed: int, amp: bool) -> None:
    """One side's steps in this process; prints its figures as one JSON line."""
    if side == "retained" and not retain_freed_memory():
        raise SystemExit("retain_freed_memory() was not applied (not glibc, or MALLOC_* set)")
    batch_size, seq_len = SHAPES[shape]
    torch.manual_seed(seed)
    cfg = harness.config_for(shape)
    model = Qwen3(cfg).train()
    batch = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1))
    step = harness.train_stepper(model, harness.ours_loss, batch, "muon", amp)
    for _ in range(2):  # warm-up: the optimizer's state exists after the first step
        step()
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        step()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "step_s": wall / steps,
                "faults": (after.ru_minflt - before.ru_minflt) / steps,
                "sys_s": (after.ru_stime - before.ru_stime) / steps,
                "peak_rss_mib": after.ru_maxrss / 1024,  # Linux: KiB
            }
        )
    )


def run_side(side: str, shape: str, steps: int, args: argparse.Namespace) -> dict[str, float]:
    """One side's figures from a fresh worker process, with no ``MALLOC_*`` from the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    cmd = [sys.executable, __file__, "--worker", side, "--shapes", shape, "--steps", str(steps)]
    cmd += ["--seed", str(args.seed)] + (["--threads", str(args.threads)] if args.threads else [])
    cmd += ["--amp"] if args.amp else []
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{side} worker failed:\n{out.stderr[-3000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = harness.common_args(__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=None, help="comma list of tiny, 100m")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per worker")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)  # run one side here
    args = parser.parse_args()
    if args.worker:
        harness.setup("cpu", args.threads)
        worker(args.worker, args.shapes, args.steps, args.seed, args.amp)
        return
    shapes = (args.shapes or ("tiny" if args.quick else "tiny,100m")).split(",")
    rounds = args.rounds or (1 if args.quick else 3)
    device = harness.setup("cpu", args.threads)
    print(f"machine: {harness.machine_line(device)}")
    rows = []
    for shape in shapes:
        steps = args.steps or (2 if args.quick else 20 if shape == "tiny" else 3)
        results: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
        for _ in range(rounds):
            for side in SIDES:
                results[side].append(run_side(side, shape, steps, args))
        ratios = [
            d["step_s"] / r["step_s"]
            for d, r in zip(results[SIDES[0]], results["retained"], strict=True)
        ]
        for side in SIDES:
            med = {k: harness.median([r[k] for r in results[side]]) for k in results[side][0]}
            ratio = harness.median(ratios) if side == "retained" else 1.0
            rows.append(
                [
                    shape,
                    side,
                    f"{med['step_s']:.3f}",
                    f"{med['faults']:,.0f}",
                    f"{med['sys_s']:.3f}",
                    f"{med['peak_rss_mib']:,.0f}",
                    f"{ratio:.2f}",
                ]
            )
    print(
        f"\n{rounds} alternating rounds of one fresh process per side, "
        f"{'bf16 autocast' if args.amp else 'float32'} (batch x seq: "
        + ", ".join(f"{s} {SHAPES[s][0]}x{SHAPES[s][1]}" for s in shapes)
        + "), medians; ratio = median over rounds of the default's step time / this side's"
    )
    harness.print_table(
        ["shape", "malloc", "s/step", "page faults/step", "sys s/step", "peak RSS MiB", "ratio"],
        rows,
    )


if __name__ == "__main__":
    main()
