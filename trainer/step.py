"""One optimizer step: micro-batches with gradient accumulation, clipping, and the update."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from optim import OptimizerSet
from qwen3.moe import RouterLosses
from trainer.build import Precision
from trainer.distributed import all_reduce_sum_, gradient_sync, group_rank_world
from trainer.spikes import SpikeMonitor


@dataclass
class StepResult:
    """What one optimizer step did, as 0-d tensors left on the device: reading one waits for the
    step to finish, so the loop sums them there (trainer.step_stats) and reads on log steps.

    ``skipped``: the update was dropped on the device (a non-finite gradient norm, or a loss
    spike with ``trainer.spike_action=skip``); ``overflow``: of those, one GradScaler dropped as
    its scale overflowed fp16 with a finite loss (expected now and then while the scale settles,
    not a sign of divergence); ``spike``: the loss was a spike (trainer/spikes.py), and
    ``spike_skipped``: its update was dropped for it."""

    loss: torch.Tensor  # this rank's mean over its micro-batches (float32)
    grad_norm: torch.Tensor  # global norm before clipping (float32)
    skipped: torch.Tensor  # bool
    overflow: torch.Tensor  # bool
    router: torch.Tensor | None = None  # MoE: (aux_loss, expert_load) means of this rank
    spike: torch.Tensor | None = None  # bool
    spike_skipped: torch.Tensor | None = None  # bool

    def read(self) -> dict[str, float]:
        """The host values (one device read): for tests and tools, not the loop."""
        fields = [self.loss, self.grad_norm, self.skipped.float(), self.overflow.float()]
        loss, norm, skipped, overflow = torch.stack(fields).tolist()
        return {"loss": loss, "grad_norm": norm, "skipped": skipped, "overflow": overflow}


def accumulate_gradients(
    model: nn.Module,
    x: torch.Tensor,  # (grad_accum * B, T)
    y: torch.Tensor,  # (grad_accum * B, T)
    grad_accum: int,
    precision: Precision,
    router: RouterLosses | None = None,
    document_ids: torch.Tensor | None = None,  # (grad_accum * B, T): packed documents
) -> torch.Tensor:
    """Forward/backward ``grad_accum`` equal slices of (x, y); returns the mean loss, a 0-dim
    float32 tensor left on the device (reading it would wait for the backward pass).

    Each slice's mean loss is divided by ``grad_accum``, so the summed gradient equals that of
    the whole batch in one pass (to float rounding). ``router`` adds a mixture of experts'
    load-balancing loss to each slice's (the returned mean is the language-model loss alone).
    ``document_ids`` keep each packed document's attention to itself (``qwen3.documents``).
    """
    scaler = precision.scaler
    loss_sum = torch.zeros((), device=x.device)
    docs = document_ids.chunk(grad_accum) if document_ids is not None else [None] * grad_accum
    micro = zip(x.chunk(grad_accum), y.chunk(grad_accum), docs, strict=True)
    for i, (xs, ys, ds) in enumerate(micro):
        # DDP exchanges gradients once, in the last micro-batch's backward; FSDP reduce-scatters
        # every micro-batch's, so that no rank holds whole gradients (trainer.distributed).
        with gradient_sync(model, enabled=i == grad_accum - 1):
            with precision.autocast():
                loss = (
                    model(xs, targets=ys) if ds is None else model(xs, targets=ys, document_ids=ds)
                )
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
    document_ids: torch.Tensor | None = None,  # (grad_accum * B, T): packed documents
) -> StepResult:
    """Accumulate gradients over ``grad_accum`` micro-batches, clip by global norm, step.

    The host never waits for the device here: a non-finite gradient norm skips the update on the
    device (``found_inf``, as GradScaler hands it to fused optimizers), and the results stay
    there. The norm is of the gradients every rank steps with (all-reduced under DDP, reduced
    over shards under FSDP), so every rank makes the same decision. A non-finite loss with
    finite gradients (a micro-batch whose targets are all masked: 0/0) still updates, and the
    loop leaves that loss out of its mean. ``prefetch`` runs once the step's work is queued, so
    the next batch's host work (memmap read, pinned copy) overlaps this step on an accelerator.
    With fp16, GradScaler unscales the gradients before clipping; a gradient that overflowed
    fp16 has a non-finite norm, skips the step and lowers the scale (``scaler.update()``, on the
    device). ``spikes`` judges the loss of ``step`` (the mean over ranks, so every rank agrees:
    one more scalar all-reduce on the device); with ``skip_spikes`` a spike's update is dropped
    on the device too.
    """
    scaler = precision.scaler
    router = RouterLosses(model)
    loss = accumulate_gradients(model, x, y, grad_accum, precision, router, document_ids)
    if scaler is not None:
        for opt in optimizers.optimizers:
            scaler.unscale_(opt)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = clip_gradients(params, clip).to(loss.device, torch.float32)
    non_finite = ~norm.isfinite()
    skipped, spike, spike_skipped = non_finite, None, None
    if spikes is not None:
        spike = spikes.observe(step, _mean_over_ranks(loss))
        spike_skipped = spike & non_finite.logical_not() if skip_spikes else torch.zeros_like(spike)
        skipped = non_finite | spike_skipped
    if prefetch is not None:
        prefetch()
    optimizers.step(scaler, found_inf=skipped.float())
    optimizers.zero_grad()
    if scaler is not None:
        overflow = non_finite & loss.isfinite()
    else:
        overflow = torch.zeros((), dtype=torch.bool, device=loss.device)
    # MoE: this rank's (aux loss, expert load) sums over its micro-batches, averaged
    moe = router.sums / router.count if router.sums is not None else None
    return StepResult(loss, norm, skipped, overflow, moe, spike, spike_skipped)


def _mean_over_ranks(loss: torch.Tensor) -> torch.Tensor:
    """The mean of every rank's loss, on the device (no host wait; ``loss`` itself in one
    process)."""
    world = group_rank_world()[1]
    if world == 1:
        return loss.detach()
    total = loss.detach().clone()
    all_reduce_sum_(total)
    return total / world
