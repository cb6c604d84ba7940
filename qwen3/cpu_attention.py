"""Causal self-attention for training on a CPU in bf16 at short sequences: two batched matmuls
around a softmax, with a hand-written backward.

Why not ``F.scaled_dot_product_attention``: torch's CPU flash kernel gains nothing from bf16
(its backward, three times its forward, ran slower in bf16 than in float32), while oneDNN's bf16
batched matmuls run at twice float32's rate on CPUs with native bf16. At the main job's shape
(16 x 256 tokens, 4 query and 2 key/value heads of 32) this path's forward and backward take
under half the flash kernel's time; by 1,024 positions the two are even, and its (T, T)
probabilities, kept for backward, grow with the square of the length: so only up to
:data:`MAX_POSITIONS` (benchmarks/results/design-measurements.md). In float32 the flash kernel
was faster and stays.

Grouped-query heads are not repeated: the g query heads of a key/value head are folded into the
rows of one (g T, D) x (D, T) product per key/value head.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from qwen3.device import cpu_has_native_bf16_matmul

# Longest sequence this path takes; longer ones go to SDPA's flash kernel (see above).
MAX_POSITIONS = 512


# Dynamo cannot trace torch's CPU probes: to a compiled block the answer is a constant.
@torch.compiler.assume_constant_result  # type: ignore[untyped-decorator]
def _native_bf16() -> bool:
    return cpu_has_native_bf16_matmul()


def use_cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether a causal, unmasked, dropout-free attention over q (B, H, T, D) and k, v
    (B, K, T, D) should run :func:`causal_attention`: on a CPU with native bf16 matmuls, all
    three in bf16, T at most :data:`MAX_POSITIONS`, with gradients being recorded (training)."""
    return (
        q.device.type == "cpu"
        and q.dtype == k.dtype == v.dtype == torch.bfloat16
        and q.shape[-2] == k.shape[-2] <= MAX_POSITIONS
        and torch.is_grad_enabled()
        and _native_bf16()
    )


def _build_bias(t: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    return torch.zeros(t, t, dtype=dtype).masked_fill(future, float("-inf")).repeat(groups, 1)


# A few lengths at a time (training repeats one; a bounded cache for runs that vary it).
_cached_bias = functools.lru_cache(maxsize=8)(_build_bias)


def _causal_bias(t: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """(groups T, T): 0 where row i's position (i mod T) may attend to column j, else -inf.
    Cached in eager; a compiled block builds it in its graph (Dynamo does not trace caches)."""
    if torch.compiler.is_compiling():
        return _build_bias(t, groups, dtype)
    return _cached_bias(t, groups, dtype)


class _CausalAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(D) + causal bias) v per key/value head, q's g heads as rows."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, h, t, d = q.shape
        kv = k.shape[1]
        g = h // kv
        scale = d**-0.5
        qg = q.reshape(b * kv, g * t, d)
        kr, vr = k.reshape(b * kv, t, d), v.reshape(b * kv, t, d)
        # The bias enters the product's output (beta=1), the scale its accumulator (alpha).
        scores = torch.baddbmm(_causal_bias(t, g, q.dtype), qg, kr.transpose(1, 2), alpha=scale)
        probs = torch.softmax(scores, dim=-1)  # (B K, g T, T), float32 inside, q's dtype out
        out = torch.bmm(probs, vr)
        ctx.save_for_backward(qg, kr, vr, probs)
        ctx.scale, ctx.shape = scale, (b, h, t, d)
        return out.view(b, h, t, d)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        qg, kr, vr, probs = ctx.saved_tensors
        b, h, t, d = ctx.shape
        kv = kr.shape[0] // b
        go = grad_out.reshape(b * kv, (h // kv) * t, d)
        grad_v = torch.bmm(probs.transpose(1, 2), go)
        grad_probs = torch.bmm(go, vr.transpose(1, 2))
        # softmax's backward in one kernel, float32 inside: p * (dp - sum(dp * p)).
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        none = grad_scores.new_empty(())  # beta=0: baddbmm's input is ignored
        grad_q = torch.baddbmm(none, grad_scores, kr, beta=0, alpha=ctx.scale)
        grad_k = torch.baddbmm(none, grad_scores.transpose(1, 2), qg, beta=0, alpha=ctx.scale)
        return grad_q.view(b, h, t, d), grad_k.view(b, kv, t, d), grad_v.view(b, kv, t, d)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)`` for q
    (B, H, T, D) and k, v (B, K, T, D), H a multiple of K, in their dtype (autocast off inside:
    the caller has cast them); (B, H, T, D)."""
    with torch.autocast(q.device.type, enabled=False):
        out: torch.Tensor = _CausalAttention.apply(q, k, v)  # type: ignore[no-untyped-call]
    return out
