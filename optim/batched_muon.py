"""torch.optim.Muon with the Newton-Schulz iteration run once per matrix shape, over a batch.

torch.optim.Muon orthogonalises its matrices one at a time, always in bf16. Here the matrices of
one shape are stacked into one ``(N, rows, cols)`` tensor and iterated with batched matmuls
(optim/muon_math.py), in float32 on CPU, where bf16 matmuls are emulated and far slower
(benchmarks/results/muon.md), bf16 elsewhere as torch does; momentum, weight decay and the update run as ``torch._foreach_*`` ops
over the whole group.

A 3-D parameter (a layer's experts, ``(E, rows, cols)``) is a batch of matrices, each
orthogonalised on its own (:func:`optim.muon_math.as_matrices`; a group's ``split_rows`` cuts each
expert's rows further, a fused gate|up into its gate and up), batched with the other matrices of
its shape: torch.optim.Muon refuses such parameters.

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

from optim.muon_math import adjusted_lr, as_matrices, default_dtype, matrix_shape, newton_schulz


class MatrixBatchMuon(Muon):
    """torch.optim.Muon that also holds 3-D parameters, each a batch of matrices
    (:func:`optim.muon_math.as_matrices`; a param group's ``split_rows``, default 1, cuts each
    one's rows into that many matrices). The base of :class:`BatchedMuon` and of
    ``optim.sharded_muon.ShardedMuon``; their steps do the orthogonalising."""

    def __init__(self, params: Any, *args: Any, **kw: Any) -> None:
        given = list(params)
        groups = given if given and isinstance(given[0], dict) else [{"params": given}]
        groups = [{**g, "params": _tensors(g["params"])} for g in groups]
        # torch.optim.Muon checks that each parameter is 2-D in its constructor: it is built with
        # a 2-D stand-in for each 3-D one (so torch's own argument checks and defaults run), then
        # holds the real parameters.
        super().__init__(
            [{**g, "params": [_stand_in(p) for p in g["params"]]} for g in groups], *args, **kw
        )
        for mine, group in zip(self.param_groups, groups, strict=True):
            for p in group["params"]:
                matrix_shape(p.shape, int(mine.get("split_rows", 1)))  # the split fits
            mine["params"] = group["params"]


def _tensors(params: Tensor | Any) -> list[Tensor]:
    return [params] if isinstance(params, Tensor) else list(params)


def _stand_in(p: Tensor) -> Tensor:
    return torch.empty(0, 0, device="meta") if p.ndim == 3 else p


class BatchedMuon(MatrixBatchMuon):
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
        split = int(group.get("split_rows", 1))
        matrices = [as_matrices(u, split) for u in updates]  # (n_i, rows, cols) each
        batches: dict[tuple[torch.Size, torch.device], list[int]] = defaultdict(list)
        for i, p in enumerate(params):
            batches[(matrices[i].shape[1:], p.device)].append(i)
        for (shape, device), members in batches.items():
            ps = [params[i] for i in members]
            # A tensor, not a float: foreach rounds a float factor to a bf16 parameter's dtype
            # first, where torch's param.mul_(float) multiplies in float32.
            torch._foreach_mul_(ps, torch.tensor(1 - lr * group["weight_decay"], device=device))
            stacked = torch.cat([matrices[i] for i in members])
            ortho = newton_schulz(
                stacked,
                group["ns_coefficients"],
                group["ns_steps"],
                group["eps"],
                self.ns_dtype or default_dtype(device),
            )
            step_lr = adjusted_lr(lr, group["adjust_lr_fn"], shape)
            pieces = torch.split(ortho, [len(matrices[i]) for i in members])
            torch._foreach_add_(
                ps, [m.reshape(p.shape) for m, p in zip(pieces, ps, strict=True)], alpha=-step_lr
            )
