"""Peak resident memory of training steps: our Qwen3 against transformers, or (``--ac``) our Qwen3
with each activation-checkpointing mode, each in a fresh process.

Each side runs in its own subprocess (both import torch and transformers, so the baselines
match), builds the same model with AdamW, and runs a few training steps while a thread samples
the process's resident set size every millisecond. Reported: RSS before the first step, the
peak during the steps, and the growth. Runs are repeated and alternate between the sides.

    .venv/bin/python benchmarks/bench_memory.py                # small, batch 8 x 256
    .venv/bin/python benchmarks/bench_memory.py --quick
    .venv/bin/python benchmarks/bench_memory.py --ac --shape 100m --batch 2 --seq 1024 --steps 1
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import harness
import torch

from optim import OptimConfig, build_optimizers
from qwen3 import Qwen3

_PAGE = os.sysconf("SC_PAGE_SIZE")
AC_SIDES = ("none", "full", "selective")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class _PeakSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = _rss_bytes()
        self.running = True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)


def child(side: str, shape: str, batch: int, seq: int, steps: int, seed: int) -> dict[str, float]:
    import transformers  # noqa: F401  (imported on both sides: equal baselines)

    harness.setup("cpu")
    torch.manual_seed(seed)
    ours = Qwen3(harness.config_for(shape)).train()
    if side in AC_SIDES:  # ours with trainer.activation_checkpointing=<side>
        ours.set_activation_checkpointing(side)  # type: ignore[arg-type]
    model = ours if side != "transformers" else harness.transformers_twin(ours)
    if side == "transformers":
        del ours
    opt = build_optimizers(model, OptimConfig(name="adamw", warmup_steps=0), max_steps=10**9)
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    before = _rss_bytes()
    sampler = _PeakSampler()
    sampler.start()
    for _ in range(steps):
        loss = model(x, targets=y) if side != "transformers" else model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    sampler.running = False
    sampler.join()
    return {"before": before / 2**20, "peak": max(sampler.peak, _rss_bytes()) / 2**20}


def main() -> None:
    parser = harness.common_args(__doc__.splitlines()[0])
    parser.add_argument("--shape", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--ac", action="store_true", help="compare activation checkpointing none/full/selective"
    )
    parser.add_argument("--child", default=None, help="internal: run one side here, print JSON")
    args = parser.parse_args()
    if args.child:
        print(
            json.dumps(child(args.child, args.shape, args.batch, args.seq, args.steps, args.seed))
        )
        return
    args.rounds = args.rounds or (1 if args.quick else 3)
    steps = 1 if args.quick else args.steps

    def run(side: str) -> dict[str, float]:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            side,
            "--shape",
            args.shape,
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
            "--steps",
            str(steps),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    sides = AC_SIDES if args.ac else ("ours", "transformers")
    results: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    for r in range(args.rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            results[side].append(run(side))
    rows = []
    for side, runs in results.items():
        before = harness.median([r["before"] for r in runs])
        peak = harness.median([r["peak"] for r in runs])
        rows.append([side, f"{before:,.0f}", f"{peak:,.0f}", f"{peak - before:,.0f}"])
    print(
        f"{args.shape}, batch {args.batch}x{args.seq}, AdamW, {steps} steps, median of "
        f"{args.rounds} fresh processes per side (MiB)"
    )
    harness.print_table(
        [
            "activation checkpointing" if args.ac else "side",
            "RSS before steps",
            "peak RSS in steps",
            "step growth",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
