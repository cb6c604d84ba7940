"""The experts of a sparse MoE block on the portable path (CPU, and CUDA outside bf16): every
expert's SwiGLU, ``down(silu(gate(x)) * up(x))``, on its own contiguous group of expert-sorted
rows, scaled by the routing weights and added back to the tokens, in one autograd Function.

Why not autograd over the expert modules: it records ~10 nodes per expert, concatenates the
outputs, the gate|up halves and the input gradients, and recomputes the sigmoid in SiLU's
backward. Here each expert's matmuls write into a few row buffers, reused in place in backward,
and SiLU's derivative is kept from forward, so each element takes one sigmoid in all: on CPU its
exp costs several multiplies (measurements in benchmarks/results/moe.md).

The parameters stay one matrix per expert (Hugging Face names, Muon per matrix); the expert
modules themselves are not called. Shapes: N tokens, k experts per token, R = N x k routed rows,
E experts, C hidden size, F expert width.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from qwen3.layers import MLP


def _by_kind(mats: Sequence[torch.Tensor], e: int) -> tuple[Sequence[torch.Tensor], ...]:
    """The E gate, E up and E down matrices of ``mats``."""
    return mats[:e], mats[e : 2 * e], mats[2 * e :]


class _SwiGLUExperts(torch.autograd.Function):
    """``sum_j w_j * expert_j(x)`` per token; see :func:`swiglu_experts`. The matrices come as E
    gate, E up, then E down."""

    @staticmethod
    def forward(
        ctx: Any,
        flat: torch.Tensor,  # (N, C)
        weights: torch.Tensor,  # (N, k) routing weights
        order: torch.Tensor,  # (R,) routed pairs (token * k + slot), sorted by expert
        counts: list[int],  # (E,) rows per expert
        *mats: torch.Tensor,
    ) -> torch.Tensor:
        e, k = len(counts), weights.shape[1]
        rows, width = order.shape[0], mats[0].shape[0]
        token = order // k  # (R,) each row's token
        row_weight = weights.reshape(-1).index_select(0, order)  # (R,)
        xs = flat.index_select(0, token)  # (R, C)
        gate, up, h = (flat.new_empty(rows, width) for _ in range(3))  # (R, F)
        training = any(ctx.needs_input_grad)
        # silu'(g) = s + silu(g) (1 - s), s = sigmoid(g): kept so backward needs no second exp.
        slope = flat.new_empty(rows, width) if training else None
        one = flat.new_ones(())
        ys = flat.new_empty(rows, flat.shape[1])  # (R, C)
        # One view per expert and buffer up front: slicing in the loop would cost ~30 calls each.
        views = [torch.split(t, counts) for t in (xs, gate, up, h, ys)]
        slopes = torch.split(slope, counts) if slope is not None else [None] * e
        for x_i, g_i, u_i, h_i, y_i, s_i, wg, wu, wd in zip(
            *views, slopes, *_by_kind(mats, e), strict=True
        ):
            torch.mm(x_i, wg.t(), out=g_i)
            torch.mm(x_i, wu.t(), out=u_i)
            if s_i is None:
                torch.ops.aten.silu.out(g_i, out=g_i)
            else:
                torch.sigmoid(g_i, out=s_i)
                g_i.mul_(s_i)  # gate now holds silu(g)
                torch.lerp(g_i, one, s_i, out=s_i)
            torch.mul(g_i, u_i, out=h_i)
            torch.mm(h_i, wd.t(), out=y_i)
        out = torch.zeros_like(flat).index_add_(0, token, ys * row_weight.unsqueeze(1))
        if training:
            ctx.save_for_backward(xs, gate, up, h, slope, ys, order, token, row_weight, *mats)
            ctx.counts = counts
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # The saved buffers are reused in place: once_differentiable, and nothing else holds them.
        xs, act, up, h, slope, ys, order, token, row_weight, *mats = ctx.saved_tensors
        counts: list[int] = ctx.counts
        e = len(counts)
        grad_ys = grad_out.index_select(0, token)  # (R, C), not yet scaled
        grad_row_weight = ys.mul_(grad_ys).sum(1)  # (R,)
        grad_weights = torch.empty_like(grad_row_weight).index_copy_(0, order, grad_row_weight)
        grad_ys.mul_(row_weight.unsqueeze(1))
        scratch = h.new_empty(max(counts, default=0), h.shape[1])  # reused expert to expert
        grads_gate, grads_up, grads_down = [], [], []
        views = [torch.split(t, counts) for t in (xs, act, up, h, slope, grad_ys)]
        for x_i, a_i, u_i, h_i, s_i, gy_i, wg, wu, wd in zip(
            *views, *_by_kind(mats, e), strict=True
        ):
            grad_h = scratch[: len(x_i)]
            torch.mm(gy_i, wd, out=grad_h)
            grads_down.append(gy_i.t() @ h_i)
            grad_up = torch.mul(grad_h, a_i, out=h_i)
            grad_gate = u_i.mul_(grad_h).mul_(s_i)
            grads_gate.append(grad_gate.t() @ x_i)
            grads_up.append(grad_up.t() @ x_i)
            # xs is spent once both weight gradients are formed: it takes the input gradient.
            torch.mm(grad_gate, wg, out=x_i)
            x_i.addmm_(grad_up, wu)
        grad_flat = torch.zeros_like(grad_out).index_add_(0, token, xs)
        grad_weights = grad_weights.view(grad_out.shape[0], -1)  # (N, k)
        return grad_flat, grad_weights, None, None, *grads_gate, *grads_up, *grads_down


def swiglu_experts(
    flat: torch.Tensor,  # (N, C)
    weights: torch.Tensor,  # (N, k) routing weights
    order: torch.Tensor,  # (R,) int64: routed pairs (token * k + slot), sorted by expert
    counts: list[int],  # (E,) rows per expert
    experts: Iterable[MLP],
) -> torch.Tensor:  # (N, C)
    """Each token's experts' SwiGLU outputs, scaled by their routing weights and summed: the same
    products as calling each expert module on its rows. Every expert gets a gradient (zero when it
    had no rows), which DDP and FSDP need from every rank. Under autocast the experts run in its
    dtype, as ``nn.Linear`` would."""
    mlps = list(experts)
    mats = [m.gate_proj.weight for m in mlps] + [m.up_proj.weight for m in mlps]
    mats += [m.down_proj.weight for m in mlps]
    device = flat.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else flat.dtype
    # Function.apply is untyped in torch's stubs.
    with torch.autocast(device, enabled=False):
        out: torch.Tensor = _SwiGLUExperts.apply(  # type: ignore[no-untyped-call]
            flat.to(dtype), weights.to(dtype), order, counts, *(m.to(dtype) for m in mats)
        )
    return out
