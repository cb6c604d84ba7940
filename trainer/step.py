"""One optimizer step: micro-batches with gradient accumulation, clipping, and the update."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from optim import OptimizerSet
from qwen3.moe import RouterLosses
from trainer.build import Precision
from trainer.distributed import gradient_sync, mean_across_ranks
from trainer.spikes import SpikeMonitor


@dataclass
class StepResult:
    """What one optimizer step did. ``skipped``: no update (non-finite loss or gradient);
    ``overflow``: of those, a step GradScaler dropped as its scale overflowed fp16 (expected
    now and then while the scale settles, so not a sign of divergence)."""

    loss: float  # mean over the micro-batches (and ranks)
    grad_norm: float  # global norm before clipping
    skipped: bool
    router: dict[str, float] = field(default_factory=dict)  # MoE: aux_loss, expert_load
    overflow: bool = False
    spike: bool = False  # skipped as a loss spike (trainer.spike_action=skip)


def accumulate_gradients(
    model: nn.Module,
    x: torch.Tensor,  # (grad_accum * B, T)
    y: torch.Tensor,  # (grad_accum * B, T)
    grad_accum: int,
    precision: Precision,
    router: RouterLosses | None = None,
) -> torch.Tensor:
    """Forward/backward ``grad_accum`` equal slices of (x, y); returns the mean loss, a 0-dim
    float32 tensor left on the device (reading it would wait for the backward pass).

    Each slice's mean loss is divided by ``grad_accum``, so the summed gradient equals that of
    the whole batch in one pass (to float rounding). ``router`` adds a mixture of experts'
    load-balancing loss to each slice's (the returned mean is the language-model loss alone).
    """
    scaler = precision.scaler
    loss_sum = torch.zeros((), device=x.device)
    micro = zip(x.chunk(grad_accum), y.chunk(grad_accum), strict=True)
    for i, (xs, ys) in enumerate(micro):
        # DDP exchanges gradients once, in the last micro-batch's backward; FSDP reduce-scatters
        # every micro-batch's, so that no rank holds whole gradients (trainer.distributed).
        with gradient_sync(model, enabled=i == grad_accum - 1):
            with precision.autocast():
                loss = model(xs, targets=ys)
            scaled = (loss + (router.take() if router is not None else 0.0)) / grad_accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += loss.detach()
    return loss_sum / grad_accum


def clip_gradients(params: list[nn.Parameter], clip: float) -> torch.Tensor:
    """Scale gradients down to global norm ``clip`` (0: no clipping); returns the norm before,
    a 0-dim tensor on the gradients' device (no host sync).

    Under FSDP the gradients are shards (DTensors): their norm is reduced over all ranks."""
    total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, clip if clip > 0 else math.inf, total)
    return total


def train_step(
    model: nn.Module,
    optimizers: OptimizerSet,
    x: torch.Tensor,  # (grad_accum * B, T)
    y: torch.Tensor,  # (grad_accum * B, T)
    grad_accum: int,
    precision: Precision,
    clip: float,
    prefetch: Callable[[], object] | None = None,
    spikes: SpikeMonitor | None = None,
    skip_spikes: bool = False,
    step: int = 0,
) -> StepResult:
    """Accumulate gradients over ``grad_accum`` micro-batches, clip by global norm, step.

    A non-finite loss or gradient skips the update. The host waits for the device once per step:
    loss, norm and their finiteness come back together. ``prefetch`` runs after the step's work
    is queued and before that wait, so the next batch's host work (memmap read, pinned copy)
    overlaps this step on an accelerator. With fp16, GradScaler unscales the gradients before
    clipping; a gradient that overflowed fp16 skips the step and lowers the scale. ``spikes``
    judges the mean loss of ``step``; with ``skip_spikes`` a spike's update is dropped too.
    """
    scaler = precision.scaler
    router = RouterLosses(model)
    loss = accumulate_gradients(model, x, y, grad_accum, precision, router)
    if scaler is not None:
        for opt in optimizers.optimizers:
            scaler.unscale_(opt)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = clip_gradients(params, clip).to(loss.device, torch.float32)
    if prefetch is not None:
        prefetch()
    # The one host sync of the step; the finiteness test itself runs on the device.
    stats = torch.stack([loss, norm, (loss.isfinite() & norm.isfinite()).float()])
    local_loss, grad_norm, finite = stats.tolist()
    mean_loss = mean_across_ranks(local_loss)  # host floats; a non-finite rank poisons the mean
    bad = not (finite and math.isfinite(mean_loss))
    spike = False
    if spikes is not None:  # the mean over ranks: every rank reaches the same verdict
        spike = bool(spikes.observe(step, torch.tensor(mean_loss))) and skip_spikes
    bad = bad or spike
    if bad:
        optimizers.skip(scaler)  # with a scaler: its update() lowers the scale
    else:
        optimizers.step(scaler)
    optimizers.zero_grad()
    overflow = bad and not spike and scaler is not None and math.isfinite(mean_loss)
    moe = {name: mean_across_ranks(v) for name, v in router.means().items()}
    return StepResult(mean_loss, grad_norm, bad, overflow=overflow, router=moe, spike=spike)
