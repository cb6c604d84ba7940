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

In bf16 or fp16 on CPU each expert's rows are padded with zero rows to a multiple of
:data:`CPU_ROW_MULTIPLE`: there oneDNN generates a kernel for every new matmul shape, and the
routed row counts change every step, so unpadded, nearly every expert matmul paid for a new
kernel (4-5x its time); padded, the few shapes recur and their kernels are reused.
"""

from __future__ import annotations

from itertools import accumulate
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
        order: torch.Tensor,  # (R,) routed pairs (token * k + slot), sorted by expert; a pair
        # may recur only if its rows are zero and its routing weight 0 (swiglu_experts' padding)
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
            ctx.counts, ctx.k = counts, k
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
        # Zeros, not empty: with padding some pairs are not in ``order`` (and its own padding
        # pair recurs, each time with a zero gradient).
        grad_weights = grad_row_weight.new_zeros(grad_out.shape[0] * ctx.k)
        grad_weights.index_copy_(0, order, grad_row_weight)
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


# Rows per expert are padded to a multiple of this in bf16/fp16 on CPU (module docstring):
# 32 keeps the shapes few (a few dozen per matmul over a run) for at most 31 zero rows each.
CPU_ROW_MULTIPLE = 32


def row_multiple_for(device_type: str, dtype: torch.dtype) -> int:
    """What :func:`swiglu_experts` pads each expert's rows to by default (module docstring)."""
    return CPU_ROW_MULTIPLE if device_type == "cpu" and dtype != torch.float32 else 1


def padded_counts(counts: list[int], multiple: int) -> list[int]:
    """Each of ``counts`` rounded up to a multiple of ``multiple``."""
    return [-(-n // multiple) * multiple for n in counts]


def pad_groups(
    order: torch.Tensor, counts: list[int], multiple: int, pad_index: int
) -> tuple[torch.Tensor, list[int]]:
    """``order`` with each expert's group grown to a multiple of ``multiple`` by entries equal to
    ``pad_index`` (after its real ones), and the grown counts."""
    padded = padded_counts(counts, multiple)
    if padded == counts:
        return order, counts
    # Where each real row lands: its index plus the padding of the groups before it.
    ends = zip(accumulate(padded, initial=0), accumulate(counts, initial=0), strict=True)
    before = [p - n for p, n in ends]
    shift = torch.tensor(before[:-1], device=order.device).repeat_interleave(
        torch.tensor(counts, device=order.device), output_size=order.shape[0]
    )
    out = order.new_full((sum(padded),), pad_index)
    out[torch.arange(order.shape[0], device=order.device) + shift] = order
    return out, padded


def swiglu_experts(
    flat: torch.Tensor,  # (N, C)
    weights: torch.Tensor,  # (N, k) routing weights
    order: torch.Tensor,  # (R,) int64: routed pairs (token * k + slot), sorted by expert
    counts: list[int],  # (E,) rows per expert
    gate_up: torch.Tensor,  # (E, 2F, C)
    down: torch.Tensor,  # (E, C, F)
    row_multiple: int | None = None,
) -> torch.Tensor:  # (N, C)
    """Each token's experts' SwiGLU outputs, scaled by their routing weights and summed. Every
    expert gets a gradient (zero when it had no rows), which DDP and FSDP need from every rank.
    Under autocast the experts run in its dtype, as ``nn.Linear`` would (the cast weights are
    then copies, as autocast's own are). ``row_multiple`` pads each expert's rows with zero rows
    to a multiple of it (None: :data:`CPU_ROW_MULTIPLE` in bf16/fp16 on CPU, else no padding)."""
    device = flat.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else flat.dtype
    if row_multiple is None:
        row_multiple = row_multiple_for(device, dtype)
    n, k = weights.shape
    padded_order, padded_counts = pad_groups(order, counts, row_multiple, pad_index=n * k)
    if padded_counts != counts:
        # Padding rows point at one more token, all zeros, with a routing weight of 0: their
        # outputs and every gradient from them are exact zeros, sliced off below.
        order, counts = padded_order, padded_counts
        flat = torch.cat([flat, flat.new_zeros(1, flat.shape[1])])
        weights = torch.cat([weights.reshape(-1), weights.new_zeros(k)]).view(n + 1, k)
    # Function.apply is untyped in torch's stubs.
    with torch.autocast(device, enabled=False):
        out: torch.Tensor = _SwiGLUExperts.apply(  # type: ignore[no-untyped-call]
            flat.to(dtype), weights.to(dtype), order, counts, gate_up.to(dtype), down.to(dtype)
        )
    return out[:n]
