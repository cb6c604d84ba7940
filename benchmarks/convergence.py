"""Convergence: Muon + AdamW against AdamW alone, each at its best learning rate, same data order.

Every run is a real ``train.py`` run (a subprocess, same seed so the model init and batch order
are identical), each with its own full schedule (warmup a fixed fraction of its length, cosine).

1. LR sweep: AdamW alone for N steps at each of ``--adamw-lrs``; Muon (+ AdamW for embeddings,
   norms) for N * fractions[0] steps at each of ``--muon-lrs`` (lr and adamw_lr tied unless
   ``--muon-adamw-lr`` is given). Best = lowest final val loss.
2. Equal budgets at the best LRs: AdamW for N steps against Muon for N * f steps, f in
   ``--fractions`` (default 0.5 and the stretch 0.4; add 1.0 for a Muon run as long as
   AdamW's, whose crossing step is the plain "steps Muon needs" figure). Prints the val-loss
   curves, the step at which each Muon run first reaches AdamW's final val loss (also
   interpolated between evals), that step over N, whether each budget ends at or below AdamW,
   and the final val_bpb of each. On the 2 shared CPU cores here a 200-step tiny run takes
   5 to 13 minutes, so the default N=400 sweep is an hour or more; --steps 200 halves it.

    .venv/bin/python benchmarks/convergence.py                   # N=400: the sweep in results/convergence.md
    .venv/bin/python benchmarks/convergence.py --steps 200 --report benchmarks/results/convergence.md
    .venv/bin/python benchmarks/convergence.py --quick           # smoke check (minutes)
    .venv/bin/python benchmarks/convergence.py -- data=tinystories   # extra train.py overrides

A finished run with identical overrides is reused from ``--out-dir``, so an interrupted
benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    """One finished training run: its settings and its eval curve."""

    optim: str
    lr: float
    steps: int
    curve: list[tuple[int, float, float]]  # (step, val_loss, val_bpb)
    seconds: float

    @property
    def final_loss(self) -> float:
        return self.curve[-1][1]

    @property
    def final_bpb(self) -> float:
        return self.curve[-1][2]

    @property
    def label(self) -> str:
        return f"{'Muon+AdamW' if self.optim == 'muon' else 'AdamW'} lr {self.lr:g}, {self.steps} steps"


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=400, help="N: AdamW's budget in optimizer steps")
    p.add_argument("--adamw-lrs", type=_floats, default=[7.5e-4, 1.5e-3, 3e-3, 6e-3])
    p.add_argument("--muon-lrs", type=_floats, default=[6e-3, 1.2e-2, 2.4e-2])
    p.add_argument(
        "--muon-adamw-lr",
        type=float,
        default=None,
        help="AdamW lr inside Muon runs (embeddings, norms); default: same as Muon's lr",
    )
    p.add_argument(
        "--fractions",
        type=_floats,
        default=[0.5, 0.4],
        help="Muon budgets as fractions of N; the first is the one swept",
    )
    p.add_argument(
        "--warmup-fraction",
        type=float,
        default=1 / 6,
        help="warmup steps as a fraction of each run (conf default: 100 of 600)",
    )
    p.add_argument("--evals", type=int, default=10, help="val evaluations over AdamW's N steps")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--model", default="tiny")
    p.add_argument("--out-dir", type=Path, default=ROOT / ".cache" / "convergence")
    p.add_argument("--report", type=Path, default=None, help="also write the tables here")
    p.add_argument("--quick", action="store_true", help="smoke check: N=40, two LRs each")
    p.add_argument("overrides", nargs="*", help="extra train.py overrides (after --)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.evals = 40, 4
        args.adamw_lrs, args.muon_lrs = args.adamw_lrs[1:], args.muon_lrs[:2]
        args.overrides = ["trainer.eval_batches=4", *args.overrides]
    if args.steps < 10 or not args.fractions or not all(0 < f <= 1 for f in args.fractions):
        p.error("--steps must be >= 10 and every --fractions value in (0, 1]")
    return args


def train_overrides(args: argparse.Namespace, optim: str, lr: float, steps: int) -> list[str]:
    """The ``train.py`` command-line overrides for one run."""
    eval_every = max(1, args.steps // args.evals)
    adamw_lr = lr if optim == "adamw" or args.muon_adamw_lr is None else args.muon_adamw_lr
    return [
        f"model={args.model}",
        f"optim={optim}",
        f"optim.lr={lr}",
        f"optim.adamw_lr={adamw_lr}",
        f"optim.warmup_steps={max(1, round(steps * args.warmup_fraction))}",
        f"trainer.max_steps={steps}",
        f"trainer.eval_every={eval_every}",
        "trainer.save_every=0",
        "trainer.keep_last=1",
        "trainer.peak_flops=1e11",  # MFU is not the point here: skip the matmul measurement
        "sample.max_new_tokens=0",
        "wandb.mode=disabled",
        f"seed={args.seed}",
        *args.overrides,
    ]


def _read_curve(metrics: Path) -> list[tuple[int, float, float]]:
    curve = []
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("val_loss") is not None:
            curve.append((rec["step"], rec["val_loss"], rec.get("val_bpb") or math.nan))
    return curve


def train(args: argparse.Namespace, optim: str, lr: float, steps: int) -> Run:
    """Run ``train.py`` (or reuse a finished run with the same overrides) and read its curve."""
    overrides = train_overrides(args, optim, lr, steps)
    name = f"{optim}-lr{lr:g}-n{steps}-seed{args.seed}"
    run_dir = args.out_dir / name
    spec = run_dir / "convergence_overrides.json"
    metrics = run_dir / "metrics.jsonl"
    if (
        spec.exists()
        and metrics.exists()
        and json.loads(spec.read_text())["overrides"] == overrides
    ):
        curve = _read_curve(metrics)
        if curve and curve[-1][0] == steps:
            print(f"  {name}: reused ({run_dir})", flush=True)
            return Run(optim, lr, steps, curve, json.loads(spec.read_text())["seconds"])
    if run_dir.exists():
        shutil.rmtree(run_dir)  # stale or unfinished: start over
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        *overrides,
        f"out_dir={args.out_dir}",
        f"run_name={name}",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0 or not metrics.exists():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        raise SystemExit(f"train.py failed for {name} (exit {proc.returncode}):\n{tail}")
    curve = _read_curve(metrics)
    spec.write_text(json.dumps({"overrides": overrides, "seconds": seconds}))
    print(
        f"  {name}: val loss {curve[-1][1]:.4f}, bpb {curve[-1][2]:.3f} ({seconds / 60:.1f} min)",
        flush=True,
    )
    return Run(optim, lr, steps, curve, seconds)


def steps_to_reach(run: Run, target: float) -> tuple[int | None, float | None]:
    """First eval step at or below ``target``, and the step linearly interpolated between evals."""
    prev: tuple[int, float] | None = None
    for step, loss, _ in run.curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return step, float(step)
            s0, l0 = prev
            return step, s0 + (step - s0) * (l0 - target) / (l0 - loss)
        prev = (step, loss)
    return None, None


def table(headers: list[str], rows: list[list[str]]) -> None:
    """A Markdown table."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    for i, row in enumerate([headers, *rows]):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def sweep(args: argparse.Namespace, optim: str, lrs: list[float], steps: int) -> list[Run]:
    print(f"sweep {optim}: {steps} steps, lr in {lrs}", flush=True)
    return [train(args, optim, lr, steps) for lr in lrs]


def best_of(runs: list[Run]) -> Run:
    finite = [r for r in runs if math.isfinite(r.final_loss)]
    if not finite:
        raise SystemExit(f"every {runs[0].optim} run diverged; lower its learning rates")
    return min(finite, key=lambda r: r.final_loss)


def report(
    args: argparse.Namespace, adamw_runs: list[Run], muon_runs: list[Run], muon_best: list[Run]
) -> None:
    """Print the sweep table, the curves, steps-to-target and final val_bpb."""
    adamw = best_of(adamw_runs)
    print("\n## LR sweep (final val loss / val bpb; each run its own full schedule)\n")
    rows = [
        [
            r.label,
            f"{r.final_loss:.4f}",
            f"{r.final_bpb:.3f}",
            f"{r.seconds / 60:.1f}",
            "best" if r is adamw or r is muon_best[0] else "",
        ]
        for r in [*adamw_runs, *muon_runs]
    ]
    table(["run", "val loss", "val bpb", "min", ""], rows)
    for runs, best in ((adamw_runs, adamw), (muon_runs, muon_best[0])):
        lrs = sorted(r.lr for r in runs)
        if len(lrs) > 1 and best.lr in (lrs[0], lrs[-1]):
            print(
                f"note: the best {best.optim} lr {best.lr:g} is at the edge of its grid; "
                "widen the grid to be sure it is the optimum"
            )

    contenders = [adamw, *muon_best]
    print("\n## Val loss by step at the best LRs\n")
    steps = sorted({s for r in contenders for s, _, _ in r.curve})
    by_step = [{s: loss for s, loss, _ in r.curve} for r in contenders]
    headers = ["step", *[r.label for r in contenders]]
    table(headers, [[str(s), *[f"{c[s]:.4f}" if s in c else "" for c in by_step]] for s in steps])

    target = adamw.final_loss
    print(f"\n## Steps for Muon to reach AdamW's final val loss {target:.4f} (N = {adamw.steps})\n")
    rows = []
    for r in muon_best:
        hit, interp = steps_to_reach(r, target)
        rows.append(
            [
                r.label,
                f"{r.final_loss:.4f}",
                f"{r.final_bpb:.3f}",
                "not reached" if hit is None else f"{hit} (~{interp:.0f})",
                "-" if interp is None else f"{interp / adamw.steps:.2f}",
                "yes" if r.final_loss <= target else "no",
            ]
        )
    rows.append(
        [
            adamw.label,
            f"{adamw.final_loss:.4f}",
            f"{adamw.final_bpb:.3f}",
            str(adamw.steps),
            "1.00",
            "-",
        ]
    )
    table(
        [
            "run",
            "final val loss",
            "final val bpb",
            "steps to target (interp.)",
            "ratio to N",
            "final <= AdamW",
        ],
        rows,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    muon_steps = [max(1, round(args.steps * f)) for f in args.fractions]
    adamw_runs = sweep(args, "adamw", args.adamw_lrs, args.steps)
    muon_runs = sweep(args, "muon", args.muon_lrs, muon_steps[0])
    best = best_of(muon_runs)
    if muon_steps[1:]:
        print(f"budgets: Muon at lr {best.lr:g} for {muon_steps[1:]} steps", flush=True)
    muon_best = [best, *[train(args, "muon", best.lr, n) for n in muon_steps[1:]]]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print(
            f"# Convergence: model={args.model}, seed {args.seed}, N={args.steps}, "
            f"warmup {args.warmup_fraction:.3f} of each run, cosine, "
            f"overrides {args.overrides or 'none'}"
        )
        report(args, adamw_runs, muon_runs, muon_best)
        print(
            f"\nthis invocation: {(time.perf_counter() - t0) / 60:.1f} min (finished runs reused)"
        )
    print("\n" + buf.getvalue(), end="")
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.report.with_name(args.report.name + ".tmp")
        tmp.write_text(buf.getvalue())
        tmp.replace(args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
