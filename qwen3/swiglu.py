"""SwiGLU, ``down(silu(x gate^T) * (x up^T))``, with a hand-written backward: the arithmetic of
the dense MLP's eager training path and of each MoE expert (qwen3.moe_experts).

Why not autograd over the ops: it stacks gate|up and splits the output (both passes strided), then
concatenates the two halves' gradients in backward, and SiLU's backward computes the sigmoid
again. Here gate and up go into contiguous buffers by two matmuls, SiLU's derivative is kept
from forward (one sigmoid per element in all: on CPU its exp costs several multiplies), and
backward reuses the forward's buffers in place. Measured in benchmarks/results/moe.md (experts)
and benchmarks/results/design-measurements.md (dense MLP).

Shapes: R rows, C hidden size, F width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

Weights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # gate (F, C), up (F, C), down (C, F)


def swiglu_forward_into(
    x: torch.Tensor,  # (R, C)
    weights: Weights,
    gate: torch.Tensor,  # (R, F) buffer: silu(x gate^T) on return
    up: torch.Tensor,  # (R, F) buffer: x up^T
    h: torch.Tensor,  # (R, F) buffer: the gated product
    slope: torch.Tensor | None,  # (R, F) buffer for silu's derivative; None without backward
    out: torch.Tensor,  # (R, C)
) -> None:
    """One SwiGLU forward written into the buffers :func:`swiglu_backward_into` takes."""
    w_gate, w_up, w_down = weights
    torch.mm(x, w_gate.t(), out=gate)
    torch.mm(x, w_up.t(), out=up)
    if slope is None:
        torch.ops.aten.silu.out(gate, out=gate)
    else:
        # silu'(g) = s + silu(g) (1 - s), s = sigmoid(g): kept so backward needs no second exp.
        torch.sigmoid(gate, out=slope)
        gate.mul_(slope)  # gate now holds silu(g)
        torch.lerp(gate, gate.new_ones(()), slope, out=slope)
    torch.mul(gate, up, out=h)
    torch.mm(h, w_down.t(), out=out)


def swiglu_backward_into(
    grad_out: torch.Tensor,  # (R, C)
    x: torch.Tensor,  # (R, C) the forward's input
    saved: tuple[torch.Tensor, ...],  # the forward's gate, up, h, slope; up and h overwritten
    weights: Weights,
    grad_weights: Weights,  # written
    grad_h: torch.Tensor,  # (R, F) scratch
    grad_x: torch.Tensor,  # (R, C) written last: it may be ``x`` itself
) -> None:
    """The gradients of one :func:`swiglu_forward_into`, reusing its buffers in place."""
    act, up, h, slope = saved
    w_gate, w_up, w_down = weights
    grad_w_gate, grad_w_up, grad_w_down = grad_weights
    torch.mm(grad_out, w_down, out=grad_h)
    torch.mm(grad_out.t(), h, out=grad_w_down)
    grad_up = torch.mul(grad_h, act, out=h)
    grad_gate = up.mul_(grad_h).mul_(slope)
    torch.mm(grad_gate.t(), x, out=grad_w_gate)
    torch.mm(grad_up.t(), x, out=grad_w_up)
    torch.mm(grad_gate, w_gate, out=grad_x)
    grad_x.addmm_(grad_up, w_up)


class _SwiGLU(torch.autograd.Function):
    """A dense SwiGLU MLP on (R, C) rows; see :func:`swiglu`."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        w_gate: torch.Tensor,
        w_up: torch.Tensor,
        w_down: torch.Tensor,
    ) -> torch.Tensor:
        rows, width = x.shape[0], w_gate.shape[0]
        gate, up, h = (x.new_empty(rows, width) for _ in range(3))
        training = any(ctx.needs_input_grad)
        slope = x.new_empty(rows, width) if training else None
        out = x.new_empty(rows, w_down.shape[0])
        swiglu_forward_into(x, (w_gate, w_up, w_down), gate, up, h, slope, out)
        if training:
            ctx.save_for_backward(x, gate, up, h, slope, w_gate, w_up, w_down)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # The saved buffers are reused in place: once_differentiable, and nothing else holds them.
        x, act, up, h, slope, *weights = ctx.saved_tensors
        w_gate, w_up, w_down = weights
        grad_weights = (torch.empty_like(w_gate), torch.empty_like(w_up), torch.empty_like(w_down))
        grad_x = torch.empty_like(x)
        swiglu_backward_into(
            grad_out.contiguous(),
            x,
            (act, up, h, slope),
            (w_gate, w_up, w_down),
            grad_weights,
            torch.empty_like(h),
            grad_x,
        )
        return grad_x, *grad_weights


def swiglu(
    x: torch.Tensor,  # (..., C)
    w_gate: torch.Tensor,  # (F, C)
    w_up: torch.Tensor,  # (F, C)
    w_down: torch.Tensor,  # (C, F)
) -> torch.Tensor:  # (..., C)
    """``down(silu(gate(x)) * up(x))`` for bias-free weights, equal to the three ``F.linear``
    calls up to float rounding. Under autocast it runs in autocast's dtype, as ``nn.Linear``
    would (the cast weights are then copies, as autocast's own are)."""
    device = x.device.type
    on = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if on else x.dtype
    rows = x.reshape(-1, x.shape[-1]).to(dtype)
    with torch.autocast(device, enabled=False):
        out: torch.Tensor = _SwiGLU.apply(  # type: ignore[no-untyped-call]  # untyped in stubs
            rows, w_gate.to(dtype), w_up.to(dtype), w_down.to(dtype)
        )
    return out.view(*x.shape[:-1], out.shape[-1])
