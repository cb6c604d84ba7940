"""Cross-entropy of the LM head fused with the head's matmul, one chunk of rows at a time.

The plain path (``F.cross_entropy(lm_head(h).float(), y)``) materialises the (N, V) float32
logits, their log-softmax and, in backward, a zero-filled (N, V) gradient plus the softmax
gradient: on CPU that was about a third of a tiny model's training step. Here each chunk of
rows computes its logits, its loss and, when gradients are needed, its gradients with respect
to the hidden states and the head weight right away (softmax minus one-hot), so no (N, V)
tensor ever exists and the softmax is computed once. The backward pass only scales the stored
gradients by the incoming one. torch has no fused linear + cross-entropy op, hence this file.
"""

from __future__ import annotations

from typing import Any

import torch


def default_chunk_rows(vocab_size: int, device: torch.device) -> int:
    """Rows per chunk so that a chunk's (rows, V) float32 logits stay cache-sized on a CPU (8 MiB:
    smaller chunks were faster there, see benchmarks/results/design-measurements.md) and big
    enough on an accelerator (256 MiB) that the chunk matmuls stay large."""
    target = 2**21 if device.type == "cpu" else 2**26
    return max(64, min(16384, target // vocab_size))


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def _loss_and_grads(
    hidden: torch.Tensor,  # (N, C)
    weight: torch.Tensor,  # (V, C)
    targets: torch.Tensor,  # (N,) int64
    ignore_index: int,
    chunk_rows: int,
    need_h: bool,
    need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Mean loss, and d(loss)/d(hidden), d(loss)/d(weight) where asked for, chunk by chunk."""
    cdt = _compute_dtype(hidden)
    # Autocast would change dtypes between the steps below; every cast here is explicit.
    with torch.autocast(hidden.device.type, enabled=False):
        h_all, w = hidden.to(cdt), weight.to(cdt)
        valid = targets != ignore_index  # (N,)
        count = valid.sum()
        # Mean over real targets; all-ignored gives 0/0 = nan like F.cross_entropy, zero grads.
        row_scale = valid.to(torch.float32) / count.clamp(min=1)  # (N,)
        safe_targets = targets.masked_fill(~valid, 0)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        )
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            h, tgt = h_all[rows], safe_targets[rows, None]  # (n, C), (n, 1)
            logp = torch.log_softmax((h @ w.t()).float(), dim=-1)  # (n, V)
            total += (-logp.gather(1, tgt).squeeze(1) * valid[rows]).sum()
            if not (need_h or need_w):
                continue
            # d(mean nll)/d(logits) = (softmax - onehot) * row_scale, built in place.
            probs = logp.exp_()
            probs.scatter_add_(1, tgt, torch.full_like(tgt, -1, dtype=probs.dtype))
            scale = row_scale[rows, None]  # (n, 1), applied on the narrow side of each matmul
            g = probs.to(cdt)
            if grad_h is not None:
                grad_h[rows] = ((g @ w).float() * scale).to(hidden.dtype)
            if grad_w is not None:
                if cdt == torch.float16:
                    # fp16 has no room for these operands: h/N and the small probabilities fall
                    # below its normal range long before GradScaler's factor reaches the backward
                    # pass, so the product is formed in float32 (and scaled by the incoming
                    # gradient, GradScaler's factor included, in backward).
                    grad_w.addmm_(probs.t(), h.float() * scale)
                elif cdt == torch.float32:
                    grad_w.addmm_(g.t(), h * scale)  # (V, C), accumulated in place
                else:  # bfloat16 has float32's exponent range
                    grad_w += g.t() @ (h.float() * scale).to(cdt)
    return total / count, grad_h, grad_w.to(weight.dtype) if grad_w is not None else None


@torch.no_grad()
def linear_cross_entropy_stats(
    hidden: torch.Tensor,  # (..., C)
    weight: torch.Tensor,  # (V, C)
    targets: torch.Tensor,  # (...,) int64
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Per position, float32 ``(..., 2)``: the cross-entropy of ``hidden @ weight.T`` against
    ``targets`` and 1.0 where the argmax is the target (0.0 otherwise); for evaluation.

    The same chunks as :func:`linear_cross_entropy` (logits in the autocast dtype, then float32),
    so no (N, V) tensor exists: at Qwen's vocabulary 8 x 4096 positions would be 20 GB."""
    shape = targets.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(weight.shape[0], hidden.device)
    cdt = _compute_dtype(hidden)
    out = torch.empty(hidden.shape[0], 2, dtype=torch.float32, device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(cdt)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            tgt = targets[rows, None]  # (n, 1)
            logp = torch.log_softmax((hidden[rows].to(cdt) @ w.t()).float(), dim=-1)  # (n, V)
            out[rows, 0] = -logp.gather(1, tgt).squeeze(1)
            out[rows, 1] = logp.argmax(-1) == targets[rows]
    return out.view(*shape, 2)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        ignore_index: int,
        chunk_rows: int,
    ) -> torch.Tensor:
        loss, ctx.grad_h, ctx.grad_w = _loss_and_grads(
            hidden, weight, targets, ignore_index, chunk_rows, *ctx.needs_input_grad[:2]
        )
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w = ctx.grad_h, ctx.grad_w
        if grad_h is not None:
            grad_h = grad_h * grad_out.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = grad_w * grad_out.to(grad_w.dtype)
        return grad_h, grad_w, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,  # (..., C)
    weight: torch.Tensor,  # (V, C)
    targets: torch.Tensor,  # (...,) int64
    ignore_index: int = -100,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, equal in value and gradient
    to ``F.cross_entropy((hidden @ weight.T).float().flatten(0, -2), targets.flatten(),
    ignore_index=ignore_index)`` but without materialising the full logits or their gradient.
    ``chunk_rows`` defaults to :func:`default_chunk_rows`."""
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(weight.shape[0], hidden.device)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows}: must be >= 1.")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"targets hold {targets.shape[0]} positions but the hidden states {hidden.shape[0]}; "
            "pass targets with the same (batch, seq) shape as input_ids."
        )
    loss: torch.Tensor = _LinearCrossEntropy.apply(  # type: ignore[no-untyped-call]
        hidden, weight, targets, ignore_index, chunk_rows
    )
    return loss
