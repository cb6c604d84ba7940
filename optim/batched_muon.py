"""torch.optim.Muon with the Newton-Schulz iteration run once per matrix shape, over a batch.

torch.optim.Muon orthogonalises its matrices one at a time, always in bf16. Here the matrices of
one shape are stacked into one ``(N, rows, cols)`` tensor and iterated with batched matmuls
(optim/muon_math.py), in float32 on CPU, where bf16 matmuls are emulated and far slower
(benchmarks/results/muon.md), bf16 elsewhere as torch does; momentum, weight decay and the update run as ``torch._foreach_*`` ops
over the whole group.

Everything else is torch.optim.Muon's: the constructor, ``param_groups``, the per-parameter
``momentum_buffer`` state (so a checkpoint loads into either class and resumes exactly), the
coefficients, eps, ns_steps, nesterov, ``adjust_lr_fn`` and the decoupled weight decay. With
``ns_dtype=torch.bfloat16`` the step is torch.optim.Muon's bit for bit (tested).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import Tensor
from torch.optim import Muon

from optim.muon_math import adjusted_lr, default_dtype, newton_schulz


class BatchedMuon(Muon):
    """torch.optim.Muon whose step orthogonalises same-shaped matrices as one batch, in
    ``ns_dtype`` (None: :func:`optim.muon_math.default_dtype` of the parameters' device;
    ``torch.bfloat16`` is torch.optim.Muon's step bit for bit)."""

    def __init__(self, params: Any, *args: Any, ns_dtype: torch.dtype | None = None, **kw: Any):
        super().__init__(params, *args, **kw)
        # An attribute, not a param_groups entry: checkpoints keep torch.optim.Muon's layout.
        self.ns_dtype = ns_dtype

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
                stacked,
                group["ns_coefficients"],
                group["ns_steps"],
                group["eps"],
                self.ns_dtype or default_dtype(device),
            )
            step_lr = adjusted_lr(lr, group["adjust_lr_fn"], shape)
            torch._foreach_add_(ps, list(ortho.unbind(0)), alpha=-step_lr)
