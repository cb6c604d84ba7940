"""One optimizer step: micro-batches with gradient accumulation, clipping, and the update."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from optim import OptimizerSet
from trainer.build import Precision
from trainer.distributed import gradient_sync, mean_across_ranks


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
    micro = zip(x.chunk(grad_accum), y.chunk(grad_accum), strict=True)
    for i, (xs, ys) in enumerate(micro):
        # Across processes, gradients are exchanged once: in the last micro-batch's backward.
        with gradient_sync(model, enabled=i == grad_accum - 1):
            with precision.autocast():
                loss = model(xs, targets=ys)
            scaled = loss / grad_accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += loss.detach()
    return (loss_sum / grad_accum).item()


def clip_gradients(params: list[nn.Parameter], clip: float) -> float:
    """Scale gradients down to global norm ``clip`` (0: no clipping); returns the norm before.

    Under FSDP the gradients are shards (DTensors): their norm is reduced over all ranks."""
    total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, clip if clip > 0 else math.inf, total)
    return float(total)


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
    mean_loss = mean_across_ranks(accumulate_gradients(model, x, y, grad_accum, precision))
    if scaler is not None:
        for opt in optimizers.optimizers:
            scaler.unscale_(opt)
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = clip_gradients(params, clip)
    bad = not math.isfinite(mean_loss) or (scaler is None and not math.isfinite(grad_norm))
    if bad:
        optimizers.skip(scaler)
    else:
        optimizers.step(scaler)
    optimizers.zero_grad()
    return StepResult(loss=mean_loss, grad_norm=grad_norm, skipped=bad)
