"""torch.optim.Muon with the Newton-Schulz iteration run once per matrix shape, over a batch.

torch.optim.Muon orthogonalises its matrices one at a time: per matrix, 15 small bf16 matmuls
and a dozen elementwise ops, each a Python-level dispatch. A model of many same-shaped
matrices (tiny-moe's 72 expert matrices, a dense model's per-layer q/k/v/o/gate/up/down) pays
that overhead per matrix. Here the matrices of one shape are stacked into one
``(N, rows, cols)`` tensor and iterated with batched matmuls (a tall batch as its transposed
view, as torch transposes a tall matrix: a contiguous transpose would round differently in
bf16, and the result would no longer be torch's bit for bit); momentum, weight decay and the
update run as ``torch._foreach_*`` ops over the whole group.

Everything else is torch.optim.Muon's: the constructor, ``param_groups``, the per-parameter
``momentum_buffer`` state (so a checkpoint loads into either class and resumes exactly), the
coefficients, eps, ns_steps, nesterov, ``adjust_lr_fn`` and the decoupled weight decay.

Not what optim.build_optimizers constructs: on the 2-core AVX2 CPU it was measured on, the step
is the bf16 matmuls' arithmetic, not their dispatch, and batching gained nothing
(benchmarks/results/muon.md). Kept, tested bit for bit, to be measured where dispatch is the
cost (a GPU) before being wired in.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import Tensor
from torch.optim import Muon

from optim.sharded_muon import adjusted_lr


def newton_schulz(
    stacked: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
) -> Tensor:
    """torch.optim.Muon's quintic Newton-Schulz iteration (``_zeropower_via_newtonschulz``) on an
    ``(N, rows, cols)`` batch, each matrix normalised by its own Frobenius norm; rewritten because
    torch's takes one 2-D matrix only. Returns bf16, as torch's does."""
    if stacked.ndim != 3:
        raise ValueError(f"expected an (N, rows, cols) batch, got shape {tuple(stacked.shape)}")
    a, b, c = coefficients
    x = stacked.bfloat16()
    tall = x.shape[1] > x.shape[2]
    if tall:
        x = x.mT
    norms = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)
    x = x.div_(norms.clamp_(min=eps))
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, gram_update, x, beta=a)
    return x.mT if tall else x


class BatchedMuon(Muon):
    """torch.optim.Muon whose step orthogonalises same-shaped matrices as one batch."""

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            bufs: list[Tensor] = []
            # torch's own: the checks (complex, sparse) and the momentum_buffer it creates.
            self._init_group(group, params, grads, bufs)
            if params:
                self._update(group, params, grads, bufs)
        return loss

    def _update(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], bufs: list[Tensor]
    ) -> None:
        momentum = group["momentum"]
        lr = float(group["lr"])
        torch._foreach_lerp_(bufs, grads, 1 - momentum)
        updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
        batches: dict[tuple[torch.Size, torch.device], list[int]] = defaultdict(list)
        for i, p in enumerate(params):
            batches[(p.shape, p.device)].append(i)
        for (shape, device), members in batches.items():
            ps = [params[i] for i in members]
            # A tensor, not a float: foreach rounds a float factor to a bf16 parameter's dtype
            # first, where torch's param.mul_(float) multiplies in float32.
            torch._foreach_mul_(ps, torch.tensor(1 - lr * group["weight_decay"], device=device))
            stacked = torch.stack([updates[i] for i in members])
            ortho = newton_schulz(
                stacked, group["ns_coefficients"], group["ns_steps"], group["eps"]
            )
            step_lr = adjusted_lr(lr, group["adjust_lr_fn"], shape)
            torch._foreach_add_(ps, list(ortho.unbind(0)), alpha=-step_lr)
