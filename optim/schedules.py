"""Learning-rate and Muon-momentum schedules as pure functions of the optimizer step.

``step`` counts optimizer steps already taken: step 0 is the first update. Warmup runs
steps 0..warmup_steps-1 at lr * (step + 1) / warmup_steps, so the first update is never zero
and the last warmup step runs at the peak. Decay follows nanoGPT's convention: the factor
reaches the floor ``min_lr_ratio`` at step == max_steps (after the final update) and stays there.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from optim.config import OptimConfig


def wsd_decay_steps(max_steps: int, decay_fraction: float) -> int:
    """Length of the warmup-stable-decay schedule's final linear decay (at least one step)."""
    return max(1, round(decay_fraction * max_steps))


def wsd_decay_start(max_steps: int, warmup_steps: int, decay_fraction: float) -> int:
    """First step of the warmup-stable-decay schedule's final linear decay."""
    return max(warmup_steps, max_steps - wsd_decay_steps(max_steps, decay_fraction))


def fit_warmup(cfg: OptimConfig, max_steps: int) -> tuple[OptimConfig, str | None]:
    """``cfg`` with a warmup that fits a ``max_steps``-long run, and a one-line note if it changed.

    The warmup must end before the run does (for wsd: before the final decay starts). A longer
    one, as the shipped 100 steps are for a quick ``trainer.max_steps=20`` try, is shortened to a
    tenth of the run, the usual warmup share, as nanoGPT and the transformers Trainer also run
    such a config rather than refuse it.
    """
    limit = max_steps - 1
    if cfg.schedule == "wsd":
        limit = max_steps - wsd_decay_steps(max_steps, cfg.decay_fraction)
    if cfg.warmup_steps <= max(limit, 0):
        return cfg, None
    warmup = max(0, min(max_steps // 10, limit))
    what = "the run" if cfg.schedule != "wsd" else "the run before its final decay"
    plural = "s" if warmup != 1 else ""
    ramp = f"warming up over {warmup} step{plural} instead" if warmup else "running without warmup"
    note = (
        f"optim.warmup_steps={cfg.warmup_steps} does not fit {what} "
        f"(trainer.max_steps={max_steps}): {ramp}"
    )
    return dataclasses.replace(cfg, warmup_steps=warmup), note


def lr_factor(
    step: int,
    *,
    schedule: str,
    warmup_steps: int,
    max_steps: int,
    min_lr_ratio: float,
    decay_fraction: float = 0.2,
) -> float:
    """Multiplier on the peak learning rate for the update at ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "wsd":
        start = wsd_decay_start(max_steps, warmup_steps, decay_fraction)
        if step < start:
            return 1.0
        progress = min(1.0, (step - start) / max(1, max_steps - start))
        return 1.0 - (1.0 - min_lr_ratio) * progress
    raise ValueError(f"unknown schedule {schedule!r}; choose one of: cosine, wsd, constant")


def lr_lambda(cfg: OptimConfig, max_steps: int) -> Callable[[int], float]:
    """The schedule of ``cfg`` as a LambdaLR function (a plain function, so the scheduler's
    state_dict stays free of code and the config, not the checkpoint, defines the schedule)."""

    def factor(step: int) -> float:
        return lr_factor(
            step,
            schedule=cfg.schedule,
            warmup_steps=cfg.warmup_steps,
            max_steps=max_steps,
            min_lr_ratio=cfg.min_lr_ratio,
            decay_fraction=cfg.decay_fraction,
        )

    return factor


def muon_momentum(step: int, *, momentum: float, warmup_steps: int, start: float) -> float:
    """Muon momentum for the update at ``step``: linear from ``start`` to ``momentum`` over
    ``warmup_steps`` (modded-nanogpt / nanochat use 0.85 -> 0.95 over 300 steps)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return momentum
    frac = step / warmup_steps
    return (1.0 - frac) * start + frac * momentum
