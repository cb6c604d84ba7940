"""Activation checkpointing of decoder blocks: keep fewer activations in the forward pass and
recompute the rest during backward, trading compute for memory.

Modes (``trainer.activation_checkpointing``), applied to every decoder block:

- ``none``: every activation is kept (fastest, most memory).
- ``full``: only each block's input is kept; the whole block runs again in backward
  (about one extra forward pass of compute, the least memory).
- ``selective``: torchtitan-style op-level selective checkpointing. Within each block the outputs
  of the matmuls and of attention (SDPA) are saved, the costly ops; everything cheap between them
  (RMSNorms, RoPE, SiLU and the gating product, residual adds, dtype casts) is recomputed. Costs
  little compute, saves the memory of the elementwise intermediates.

Both use ``torch.utils.checkpoint`` non-reentrant (the form that works with FSDP2, DDP and
``torch.compile``), applied inside each block's ``forward`` so that FSDP2's per-block hooks stay
outside the recomputed region (torchtitan's order) and parameter names stay Hugging Face's.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

ActivationCheckpointing = Literal["none", "full", "selective"]
MODES: tuple[str, ...] = ("none", "full", "selective")


@functools.cache
def _saved_ops() -> frozenset[Any]:
    """The ops whose outputs selective checkpointing saves: matmuls (the MoE experts' grouped
    one too) and every SDPA kernel that exists in this torch build (CPU, flash,
    memory-efficient, cuDNN, math)."""
    aten = torch.ops.aten
    names = (
        "mm",
        "addmm",
        "bmm",
        "_grouped_mm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_attention_math",
    )
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


def _policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _saved_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts() -> Any:
    # torch leaves this public function unannotated
    return create_selective_checkpoint_contexts(_policy)  # type: ignore[no-untyped-call]


_recompute = threading.local()


def recomputing() -> bool:
    """Whether an eager checkpointed block is running again for backward. Code with side effects
    beyond its outputs (a MoE block keeping its routing for the auxiliary loss) skips them
    then: the recomputed values would outlive the backward. torch has no public question for
    this. A compiled block never asks (its backward replays no Python); check
    ``torch.compiler.is_compiling()`` first, Dynamo cannot trace this."""
    return getattr(_recompute, "depth", 0) > 0


@contextlib.contextmanager
def _marked(inner: contextlib.AbstractContextManager[Any]) -> Iterator[None]:
    _recompute.depth = getattr(_recompute, "depth", 0) + 1
    try:
        with inner:
            yield
    finally:
        _recompute.depth -= 1


def _marked_full() -> tuple[Any, Any]:
    return contextlib.nullcontext(), _marked(contextlib.nullcontext())


def _marked_selective() -> tuple[Any, Any]:
    forward, recompute = _selective_contexts()
    return forward, _marked(recompute)


def run_block(
    fn: Callable[..., torch.Tensor], mode: ActivationCheckpointing, *args: Any
) -> torch.Tensor:
    """``fn(*args)``, checkpointed as ``mode`` says when gradients are being recorded (under
    ``no_grad``, e.g. evaluation and generation, there is nothing to save or recompute)."""
    if mode == "none" or not torch.is_grad_enabled():
        return fn(*args)
    # Eager recomputation is marked (recomputing()); under compile torch takes only its own
    # selective contexts (it re-plans the checkpoint itself), and the backward replays no Python.
    compiling = torch.compiler.is_compiling()
    if mode == "full":
        if compiling:  # Dynamo takes no context_fn for plain checkpointing, not even the no-op
            out: torch.Tensor = checkpoint(fn, *args, use_reentrant=False)
            return out
        out = checkpoint(fn, *args, use_reentrant=False, context_fn=_marked_full)
        return out
    if mode == "selective":
        contexts = _selective_contexts if compiling else _marked_selective
        out = checkpoint(fn, *args, use_reentrant=False, context_fn=contexts)
        return out
    raise ValueError(f"activation checkpointing mode {mode!r} is not one of {', '.join(MODES)}")
