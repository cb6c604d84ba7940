"""The experts of a sparse MoE block, run over rows already sorted by expert.

Two ways, both computing every expert's SwiGLU, ``down(silu(gate(x)) * up(x))``, on its own
contiguous group of rows and nothing else:

- :func:`swiglu_experts` (CPU, and CUDA outside bf16): one matmul per projection and expert, with
  a hand-written backward (:class:`_SwiGLUExperts`). Autograd over the per-expert modules would
  record ~10 nodes per expert, concatenate the outputs and weights and keep every intermediate
  separately; here each expert's rows go through its matmuls and the element-wise work while they
  are still in cache, written into a few preallocated buffers, and the routing weights and the
  scatter back to the tokens are part of the same function (benchmarks/results/moe.md).
- :func:`grouped_swiglu` (CUDA in bf16): all experts in two ``F.grouped_mm`` calls.

The parameters stay one matrix per expert (Hugging Face names, Muon per matrix); the expert
modules themselves are not called. Shapes: N tokens, R = N x k routed rows, E experts, C hidden
size, F expert width.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from qwen3.layers import MLP


def _slices(counts: Sequence[int]) -> list[slice]:
    """The row range of each expert in the expert-sorted rows."""
    out, start = [], 0
    for n in counts:
        out.append(slice(start, start + n))
        start += n
    return out


class _SwiGLUExperts(torch.autograd.Function):
    """``sum_j w_j * expert_j(x)`` per token from expert-sorted (token, weight) rows; see
    :func:`swiglu_experts`. Weights come as E gate, E up, then E down matrices."""

    @staticmethod
    def forward(
        ctx: Any,
        flat: torch.Tensor,  # (N, C)
        token: torch.Tensor,  # (R,) token of each row, rows sorted by expert
        weight: torch.Tensor,  # (R,) routing weight of each row
        counts: list[int],  # (E,) rows per expert
        *mats: torch.Tensor,
    ) -> torch.Tensor:
        e = len(counts)
        gate_w, up_w, down_w = mats[:e], mats[e : 2 * e], mats[2 * e :]
        rows, width = token.shape[0], gate_w[0].shape[0]
        xs = flat.index_select(0, token)  # (R, C)
        gate, up, act, h = (flat.new_empty(rows, width) for _ in range(4))  # (R, F) each
        ys = flat.new_empty(rows, flat.shape[1])  # (R, C)
        for i, s in enumerate(_slices(counts)):
            torch.mm(xs[s], gate_w[i].t(), out=gate[s])
            torch.mm(xs[s], up_w[i].t(), out=up[s])
            torch.ops.aten.silu.out(gate[s], out=act[s])
            torch.mul(act[s], up[s], out=h[s])
            torch.mm(h[s], down_w[i].t(), out=ys[s])
        out = torch.zeros_like(flat).index_add_(0, token, ys * weight.unsqueeze(1))
        ctx.save_for_backward(xs, token, weight, gate, up, act, h, ys, *mats)
        ctx.counts = counts
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xs, token, weight, gate, up, act, h, ys, *mats = ctx.saved_tensors
        counts = ctx.counts
        e = len(counts)
        gate_w, up_w, down_w = mats[:e], mats[e : 2 * e], mats[2 * e :]
        grad_ys = grad_out.index_select(0, token)  # (R, C), unscaled
        grad_weight = (grad_ys * ys).sum(1)
        grad_ys.mul_(weight.unsqueeze(1))
        # Per-expert scratch, reused from one expert to the next.
        most = max(counts, default=0)
        grad_h_buf, grad_up_buf = (h.new_empty(most, h.shape[1]) for _ in range(2))
        grad_xs = torch.empty_like(xs)
        grads_gate, grads_up, grads_down = [], [], []
        for i, s in enumerate(_slices(counts)):
            n = s.stop - s.start
            grad_h, grad_up = grad_h_buf[:n], grad_up_buf[:n]
            torch.mm(grad_ys[s], down_w[i], out=grad_h)
            grads_down.append(grad_ys[s].t() @ h[s])
            torch.mul(grad_h, act[s], out=grad_up)
            grad_h.mul_(up[s])
            grad_gate = torch.ops.aten.silu_backward.grad_input(grad_h, gate[s], grad_input=grad_h)
            torch.mm(grad_gate, gate_w[i], out=grad_xs[s])
            grad_xs[s].addmm_(grad_up, up_w[i])
            grads_gate.append(grad_gate.t() @ xs[s])
            grads_up.append(grad_up.t() @ xs[s])
        grad_flat = xs.new_zeros(grad_out.shape).index_add_(0, token, grad_xs)
        return grad_flat, None, grad_weight, None, *grads_gate, *grads_up, *grads_down


def swiglu_experts(
    flat: torch.Tensor,  # (N, C)
    token: torch.Tensor,  # (R,) int64: the token of each routed row, rows sorted by expert
    weight: torch.Tensor,  # (R,) each row's routing weight
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
            flat.to(dtype), token, weight.to(dtype), counts, *(m.to(dtype) for m in mats)
        )
    return out


def grouped_swiglu(
    xs: torch.Tensor,  # (R, C) routed rows, sorted by expert
    counts: torch.Tensor,  # (E,) rows per expert
    experts: Iterable[MLP],
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Every expert's SwiGLU on its rows as two grouped matmuls (``F.grouped_mm``; gate and up
    stacked), equal to calling each expert on its rows, computed in ``dtype`` (the kernel does
    not autocast). The per-expert weights are stacked on each call: the parameters stay one
    matrix per expert (HF names, Muon per matrix)."""
    mlps = list(experts)
    dtype = dtype or xs.dtype
    offs = counts.cumsum(0).to(torch.int32)
    gate_up = torch.stack([torch.cat((m.gate_proj.weight, m.up_proj.weight)) for m in mlps])
    down = torch.stack([m.down_proj.weight for m in mlps])  # (E, C, F)
    h = F.grouped_mm(xs.to(dtype), gate_up.to(dtype).transpose(1, 2), offs=offs)
    gate, up = h.chunk(2, dim=-1)
    # The kernel takes only dense gradients: keep the product contiguous for its backward.
    return F.grouped_mm((F.silu(gate) * up).contiguous(), down.to(dtype).transpose(1, 2), offs=offs)
