"""One optimizer step: micro-batches with gradient accumulation, clipping, and the update."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from optim import OptimizerSet
from trainer.precision import Precision


@dataclass
class StepResult:
    """What one optimizer step did. ``skipped``: no update (non-finite loss or gradient)."""

    loss: float  # mean over the micro-batches
    grad_norm: float  # global norm before clipping
    skipped: bool


def accumulate_gradients(
    model: nn.Module,
    x: torch.Tensor,  # (grad_accum * B, T)
    y: torch.Tensor,  # (grad_accum * B, T)
    grad_accum: int,
    precision: Precision,
) -> float:
    """Forward/backward ``grad_accum`` equal slices of (x, y); returns the mean loss.

    Each slice's mean loss is divided by ``grad_accum``, so the summed gradient equals that of
    the whole batch in one pass (to float rounding).
    """
    scaler = precision.scaler
    loss_sum = torch.zeros((), device=x.device)
    for xs, ys in zip(x.chunk(grad_accum), y.chunk(grad_accum), strict=True):
        with precision.autocast():
            loss = model(xs, targets=ys)
        scaled = loss / grad_accum
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += loss.detach()
    return (loss_sum / grad_accum).item()


def train_step(
    model: nn.Module,
    optimizers: OptimizerSet,
    x: torch.Tensor,  # (grad_accum * B, T)
    y: torch.Tensor,  # (grad_accum * B, T)
    grad_accum: int,
    precision: Precision,
    clip: float,
) -> StepResult:
    """Accumulate gradients over ``grad_accum`` micro-batches, clip by global norm, step.

    A non-finite loss or gradient skips the update (with fp16 the GradScaler handles non-finite
    gradients itself, as loss scaling expects them now and then).
    """
    scaler = precision.scaler
    mean_loss = accumulate_gradients(model, x, y, grad_accum, precision)
    if scaler is not None:
        for opt in optimizers.optimizers:
            scaler.unscale_(opt)
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf))
    bad = not math.isfinite(mean_loss) or (scaler is None and not math.isfinite(grad_norm))
    if bad:
        if scaler is not None:
            scaler.update()
    else:
        optimizers.step(scaler)
    optimizers.zero_grad()
    return StepResult(loss=mean_loss, grad_norm=grad_norm, skipped=bad)
