"""The experts of a sparse MoE block on the portable path (CPU, and CUDA outside bf16): every
expert's SwiGLU, ``down(silu(gate(x)) * up(x))``, on its own contiguous group of expert-sorted
rows, scaled by the routing weights and added back to the tokens, in one autograd Function.

Why not autograd over per-expert ops: it records ~10 nodes per expert and concatenates the
outputs and the input gradients. Here each expert's SwiGLU (qwen3.swiglu's arithmetic, SiLU's
derivative kept from forward) writes into row buffers shared by all experts, reused in place in
backward (measurements in benchmarks/results/moe.md).

The weights are the block's two 3-D parameters (``gate_up`` (E, 2F, C), ``down`` (E, C, F));
each expert's matrices are views of them, never copies, and the weight gradients are written
straight into one (E, 2F, C) and one (E, C, F) buffer. Shapes: N tokens, k experts per token,
R = N x k routed rows, E experts, C hidden size, F expert width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from qwen3.swiglu import swiglu_backward_into, swiglu_forward_into


class _SwiGLUExperts(torch.autograd.Function):
    """``sum_j w_j * expert_j(x)`` per token; see :func:`swiglu_experts`."""

    @staticmethod
    def forward(
        ctx: Any,
        flat: torch.Tensor,  # (N, C)
        weights: torch.Tensor,  # (N, k) routing weights
        order: torch.Tensor,  # (R,) routed pairs (token * k + slot), sorted by expert
        counts: list[int],  # (E,) rows per expert
        gate_up: torch.Tensor,  # (E, 2F, C)
        down: torch.Tensor,  # (E, C, F)
    ) -> torch.Tensor:
        k, width = weights.shape[1], down.shape[2]
        rows = order.shape[0]
        token = order // k  # (R,) each row's token
        row_weight = weights.reshape(-1).index_select(0, order)  # (R,)
        xs = flat.index_select(0, token)  # (R, C)
        gate, up, h = (flat.new_empty(rows, width) for _ in range(3))  # (R, F)
        training = any(ctx.needs_input_grad)
        # silu'(g) = s + silu(g) (1 - s), s = sigmoid(g): kept so backward needs no second exp.
        slope = flat.new_empty(rows, width) if training else None
        ys = flat.new_empty(rows, flat.shape[1])  # (R, C)
        # One view per expert and buffer up front: slicing in the loop would cost ~30 calls each.
        views = [torch.split(t, counts) for t in (xs, gate, up, h, ys)]
        slopes = torch.split(slope, counts) if slope is not None else [None] * len(counts)
        for x_i, g_i, u_i, h_i, y_i, s_i, w_gu, w_d in zip(
            *views, slopes, gate_up, down, strict=True
        ):
            # Gate and up by two matmuls into contiguous buffers: one matmul into a (rows, 2F)
            # buffer leaves every element-wise pass on strided halves, ~8% slower in all.
            expert = (w_gu[:width], w_gu[width:], w_d)
            swiglu_forward_into(x_i, expert, g_i, u_i, h_i, s_i, y_i)
        out = torch.zeros_like(flat).index_add_(0, token, ys * row_weight.unsqueeze(1))
        if training:
            # Activations and the parameters themselves: no copy of any weight is kept.
            ctx.save_for_backward(
                xs, gate, up, h, slope, ys, order, token, row_weight, gate_up, down
            )
            ctx.counts = counts
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # The saved buffers are reused in place: once_differentiable, and nothing else holds them.
        xs, act, up, h, slope, ys, order, token, row_weight, gate_up, down = ctx.saved_tensors
        counts: list[int] = ctx.counts
        width = down.shape[2]
        grad_ys = grad_out.index_select(0, token)  # (R, C), not yet scaled
        grad_row_weight = ys.mul_(grad_ys).sum(1)  # (R,)
        grad_weights = torch.empty_like(grad_row_weight).index_copy_(0, order, grad_row_weight)
        grad_ys.mul_(row_weight.unsqueeze(1))
        # Every expert's weight gradient written in place (an expert without rows gets zeros).
        grad_gate_up, grad_down = torch.empty_like(gate_up), torch.empty_like(down)
        scratch = h.new_empty(max(counts, default=0), width)  # reused expert to expert
        views = [torch.split(t, counts) for t in (xs, act, up, h, slope, grad_ys)]
        for x_i, a_i, u_i, h_i, s_i, gy_i, w_gu, w_d, gw_gu, gw_d in zip(
            *views, gate_up, down, grad_gate_up, grad_down, strict=True
        ):
            # xs is spent once both weight gradients are formed: it takes the input gradient.
            swiglu_backward_into(
                gy_i,
                x_i,
                (a_i, u_i, h_i, s_i),
                (w_gu[:width], w_gu[width:], w_d),
                (gw_gu[:width], gw_gu[width:], gw_d),
                scratch[: len(x_i)],
                x_i,
            )
        grad_flat = torch.zeros_like(grad_out).index_add_(0, token, xs)
        grad_weights = grad_weights.view(grad_out.shape[0], -1)  # (N, k)
        return grad_flat, grad_weights, None, None, grad_gate_up, grad_down


def swiglu_experts(
    flat: torch.Tensor,  # (N, C)
    weights: torch.Tensor,  # (N, k) routing weights
    order: torch.Tensor,  # (R,) int64: routed pairs (token * k + slot), sorted by expert
    counts: list[int],  # (E,) rows per expert
    gate_up: torch.Tensor,  # (E, 2F, C)
    down: torch.Tensor,  # (E, C, F)
) -> torch.Tensor:  # (N, C)
    """Each token's experts' SwiGLU outputs, scaled by their routing weights and summed. Every
    expert gets a gradient (zero when it had no rows), which DDP and FSDP need from every rank.
    Under autocast the experts run in its dtype, as ``nn.Linear`` would (the cast weights are
    then copies, as autocast's own are)."""
    device = flat.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else flat.dtype
    # Function.apply is untyped in torch's stubs.
    with torch.autocast(device, enabled=False):
        out: torch.Tensor = _SwiGLUExperts.apply(  # type: ignore[no-untyped-call]
            flat.to(dtype), weights.to(dtype), order, counts, gate_up.to(dtype), down.to(dtype)
        )
    return out
