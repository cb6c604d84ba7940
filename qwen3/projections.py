"""Projections in fewer, faster calls: q/k/v and gate/up as one matmul against stacked weights,
transposed weight copies for inference, and the cache that keeps such derived weights on their
module until a source changes.

Every inference-only branch asks :func:`inference_mode`, which tests ``is_compiling()`` first:
Dynamo cannot trace ``torch.is_inference_mode_enabled()``, and one such call in a decoder block
breaks the compiled training graph in every layer."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Projections are stacked only up to this many weight elements per stack (4 MiB in float32): there
# one call saves real per-call overhead (at batch 1 a small matmul takes about as long as the
# overhead of the call itself); above it the matmuls dominate, and the stacked copy (kept for
# backward in training) would only cost memory.
_STACK_MAX_NUMEL = 2**20


def inference_mode() -> bool:
    """Whether this is eager code under ``torch.inference_mode()`` (generation, the server), the
    only place where the inference fast paths run; never while Dynamo traces (``is_compiling()``
    is tested first, so a compiled block never evaluates the call Dynamo cannot trace)."""
    return not torch.compiler.is_compiling() and torch.is_inference_mode_enabled()


def _derived(
    owner: nn.Module,
    slot: str,
    sources: Sequence[torch.Tensor],
    build: Callable[[], tuple[torch.Tensor | None, ...]],
) -> tuple[torch.Tensor | None, ...]:
    """``build()`` (tensors computed from ``sources``), cached on ``owner`` under ``slot`` for as
    long as no source changes: an in-place update (an optimizer step), new storage (``.to()``, a
    loaded state dict). Cached only under ``torch.inference_mode()``, which is how generation and
    the server run a model; everything else (training, evaluation under ``no_grad``, compile's
    tracing) builds afresh. The training model is never cached because its weights can change
    unseen by the key: FSDP2 refills unsharded parameters in place without bumping ``_version``,
    into storage it frees and reallocates (on CUDA often at the same address), so an evaluation
    between steps could read the previous one's weights. Inference tensors (no version counter)
    also build afresh. This is the per-token decode path, so the hit case is kept to a few
    attribute reads."""
    if not inference_mode():
        return build()
    # The entry holds the sources' storage alive, so no new tensor (another dtype or device after
    # .to(), a state dict loaded with assign=True) can reuse those addresses: an equal
    # (address, version) key means the very same, unmodified tensors.
    if any(t.is_inference() for t in sources):
        return build()
    key = [(t.data_ptr(), t._version) for t in sources]
    entry = owner.__dict__.get(slot)
    if entry is not None and entry[0] == key:
        value: tuple[torch.Tensor | None, ...] = entry[2]
        return value
    value = build()
    owner.__dict__[slot] = (key, [t.detach() for t in sources], value)
    return value


# A transposed copy of one weight is cached for inference up to this many elements (32 MiB in
# float32: an LM head of vocabulary 8192 x width 1024); a larger one (the head of an official
# 151k vocabulary) runs as it is.
_TRANSPOSE_MAX_NUMEL = 2**23
# In inference a stack is cached transposed, which makes its matmul faster at one row per call:
# worth a copy for larger stacks than in training (small's gate/up, 1.5 M elements).
_INFERENCE_STACK_MAX_NUMEL = 2**22


def _transposed(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (out, in) as a contiguous (in, out) copy, returned as its (out, in) view: what
    ``F.linear`` takes, and it hands the matmul the (in, out) layout. At one row per call
    (batch-1 decoding) torch's kernels stream that layout 1.2-2.2x faster when the output is at
    least as wide as the input (1 thread, this repo's shapes: benchmarks/results/generate.md);
    with more rows both layouts give the same numbers at about the same speed."""
    return weight.t().contiguous().t()


def inference_linear(x: torch.Tensor, linear: nn.Module) -> torch.Tensor:
    """``linear(x)``; under ``torch.inference_mode()`` against a cached transposed copy of its
    weight (:func:`_transposed`, :func:`_derived`) when that pays: an output at least as wide as
    the input, and at most ``_TRANSPOSE_MAX_NUMEL`` elements (the LM head of a small model)."""
    if not inference_mode() or type(linear) is not nn.Linear:
        return linear(x)  # also int8 (qwen3.quantize): packed weights of their own
    weight = linear.weight
    if weight.numel() > _TRANSPOSE_MAX_NUMEL or weight.shape[0] < weight.shape[1]:
        return linear(x)

    def build() -> tuple[torch.Tensor | None, ...]:
        return (_transposed(weight),)

    (fast,) = _derived(linear, "_transposed", [weight], build)
    assert fast is not None
    return F.linear(x, fast, linear.bias)


def stacked_linear(
    owner: nn.Module, x: torch.Tensor, linears: tuple[nn.Linear, ...]
) -> torch.Tensor | None:
    """``torch.cat([lin(x) for lin in linears], -1)`` as one matmul against the stacked weights,
    or None where stacking does not pay: the caller then runs each projection on its own, and
    their outputs are never concatenated (that copy would move every output byte twice).

    Measured on 2 CPU cores at the tiny shape: one stacked matmul takes half the time of three.
    With gradients the weights are concatenated every call (autograd splits the gradient back);
    without, the stacked copy is cached on ``owner`` (:func:`_derived`), under
    ``torch.inference_mode()`` transposed (:func:`_transposed`). Large stacks are not worth a
    copy (kept for backward, and one FSDP could not free): None. So is an int8 projection
    (qwen3.quantize), whose packed weights run one kernel each.
    """
    if not all(isinstance(lin, nn.Linear) for lin in linears):
        return None
    weights: list[torch.Tensor] = [lin.weight for lin in linears]
    biases: list[torch.Tensor] = []
    if linears[0].bias is not None:  # the layers of one stack agree (config.attention_bias)
        biases = [lin.bias for lin in linears]

    inference = inference_mode()
    limit = _INFERENCE_STACK_MAX_NUMEL if inference else _STACK_MAX_NUMEL
    if sum(w.numel() for w in weights) > limit:
        return None

    def build() -> tuple[torch.Tensor | None, ...]:
        weight = torch.cat(weights)
        # The copy cached for inference is laid out (in, out): a stack is wider than its input.
        weight = _transposed(weight) if inference else weight
        return weight, torch.cat(biases) if biases else None

    weight, bias = _derived(owner, "_stacked", weights + biases, build)
    assert weight is not None
    return F.linear(x, weight, bias)
