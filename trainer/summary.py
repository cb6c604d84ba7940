"""The end-of-run report: final metrics, throughput, wall time, where things are, samples."""

from __future__ import annotations

import math
from pathlib import Path

from trainer.loop import Outcome


def format_duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m}m {s:02d}s" if m else f"{seconds:.1f}s"


def summary_text(
    outcome: Outcome, run_dir: Path, wall_seconds: float, peak_flops: float, tokens_per_step: int
) -> str:
    """A few aligned lines; the val metrics are those of the last evaluation."""
    ev = outcome.final_eval
    lines = [
        "",
        "== summary ==",
        f"run dir         {run_dir}",
        f"steps           {outcome.step} ({outcome.step * tokens_per_step:,} tokens)",
    ]
    if ev:
        bpb = f"   val bpb {ev['val_bpb']:.3f}" if "val_bpb" in ev else ""
        lines.append(
            f"val loss        {ev['val_loss']:.4f}   val acc {ev['val_acc']:.4f}   "
            f"val ppl {ev['val_ppl']:.2f}{bpb}"
        )
    if math.isfinite(outcome.best_val_loss):
        lines.append(
            f"best            {run_dir / 'best'} -> step {outcome.best_step} "
            f"(val loss {outcome.best_val_loss:.4f})"
        )
    lines += [
        f"tokens/s        {outcome.tokens_per_s:,.0f}   MFU {outcome.mfu:.1%} of "
        f"{peak_flops / 1e9:,.0f} GFLOP/s",
        f"training time   {format_duration(outcome.train_seconds)}",
        f"wall time       {format_duration(wall_seconds)}",
    ]
    return "\n".join(lines)


def samples_text(prompts: list[str], completions: list[str]) -> str:
    """Each prompt with its completion, separated by rules."""
    parts = ["", "== samples =="]
    for prompt, text in zip(prompts, completions, strict=True):
        parts += ["-" * 60, prompt + text]
    parts.append("-" * 60)
    return "\n".join(parts)
