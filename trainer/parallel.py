"""Wrap the model for multi-process training: DistributedDataParallel, or FSDP2 sharding.

One process: the model as is. Several, ``trainer.fsdp=false``: every rank holds the whole model
and DDP all-reduces (averages) the gradients in buckets during ``backward``. ``trainer.fsdp=true``:
:mod:`trainer.fsdp` shards parameters, gradients and optimizer state across the ranks.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import cast

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from qwen3 import Qwen3
from trainer.distributed import DistInfo


def wrap_model(
    model: Qwen3, dist: DistInfo, device: torch.device, fsdp: bool, compile: bool
) -> nn.Module:
    """What the training step calls. ``model`` is sharded in place when ``fsdp``; build the
    optimizers after this call, on ``model``'s (then sharded) parameters."""
    forward: nn.Module = model
    if fsdp and not dist.is_distributed:
        warnings.warn(
            "trainer.fsdp=true in a single process: nothing to shard across, training unsharded; "
            "launch with torchrun --nproc_per_node=N to shard",
            stacklevel=2,
        )
    elif fsdp:
        from trainer.fsdp import shard_model

        shard_model(model, device)
    elif dist.is_distributed:
        forward = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            forward_sync_buffers=False,  # only RoPE tables, the same on every rank
        )
    return cast(nn.Module, torch.compile(forward)) if compile else forward


def _unwrap_compiled(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Within this context ``backward`` only accumulates local gradients when ``enabled`` is
    false (the non-final micro-batches of gradient accumulation), so the ranks communicate
    once per optimizer step."""
    inner = _unwrap_compiled(model)
    if enabled:
        yield
    elif isinstance(inner, DistributedDataParallel):
        with inner.no_sync():
            yield
    elif isinstance(inner, FSDPModule):
        inner.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            inner.set_requires_gradient_sync(True)
    else:
        yield
