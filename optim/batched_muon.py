"""torch.optim.Muon with the Newton-Schulz iteration run once per matrix shape, over a batch, the
skip of a non-finite step decided on the device, and (under DDP) the iteration split across ranks.

torch.optim.Muon orthogonalises its matrices one at a time, always in bf16. Here the matrices of
one shape are stacked into one ``(N, rows, cols)`` tensor and iterated with batched matmuls
(optim/muon_math.py), in float32 on CPU, where bf16 matmuls are emulated and far slower
(benchmarks/results/muon.md), bf16 elsewhere as torch does; momentum, weight decay and the update
run as ``torch._foreach_*`` ops over the whole group. A parameter of more than two dimensions
(an MoE layer's ``(E, out, in)`` experts) joins the batch of its trailing 2-D shape as its
``E`` slices, each orthogonalised on its own (:func:`optim.muon_math.matrix_batches`).

Under DDP every rank holds the same averaged gradients, so every rank would run the same whole
iteration. With ``process_group`` each rank orthogonalises its share of every shape's batch and
the results are all-gathered, one collective per shape per step, in the dtype the iteration
produced (bf16 on GPUs, so half of float32's bytes; float32 on CPU, where the iteration runs in
float32 and a bf16 exchange would make the ranks' weights differ from one process's).

Everything else is torch.optim.Muon's: the constructor, ``param_groups``, the per-parameter
``momentum_buffer`` state (so a checkpoint loads into either class and resumes exactly), the
coefficients, eps, ns_steps, nesterov, ``adjust_lr_fn`` and the decoupled weight decay. With
``ns_dtype=torch.bfloat16`` the step is torch.optim.Muon's bit for bit (tested).

Like torch's fused optimizers it takes ``found_inf`` (and ``grad_scale``) as attributes, which
``torch.amp.GradScaler`` and the trainer's step set: a step with ``found_inf`` 1 leaves
parameters and momentum exactly as they were, without the host reading the flag.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.optim import Muon

from optim.muon_math import (
    adjusted_lr,
    default_dtype,
    matrix_batches,
    matrix_shape,
    newton_schulz,
)

# Orthogonalising one batch in stages, so that one batch's transfers overlap another's iteration:
# the batch is started (maybe a transfer in flight), then advanced (the iteration run, maybe a
# transfer back started), then finished: the result of each member, shaped like its local update.
Finish = Callable[[], list[Tensor]]
Pending = Callable[[], Finish]


def local(t: Tensor) -> Tensor:
    """This rank's part of ``t`` (the tensor itself when it is not a DTensor)."""
    return t.to_local() if isinstance(t, DTensor) else t


class MatrixBatchMuon(Muon):
    """torch.optim.Muon that also holds 3-D parameters, each a batch of matrices
    (:func:`optim.muon_math.as_matrices`; a param group's ``split_rows``, default 1, cuts each
    one's rows into that many matrices). The base of :class:`BatchedMuon` (and so of
    ``optim.sharded_muon.ShardedMuon``); their steps do the orthogonalising."""

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
    ``torch.bfloat16`` is torch.optim.Muon's step bit for bit). With ``process_group`` (DDP: the
    parameters and gradients are the same on every rank of it) each rank iterates on its share
    of each batch and all-gathers the rest; every rank of the group must call ``step``."""

    # GradScaler hands this optimizer ``grad_scale`` and ``found_inf`` instead of reading
    # found_inf on the host and skipping the call (as for torch's fused optimizers).
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Any,
        *args: Any,
        ns_dtype: torch.dtype | None = None,
        process_group: dist.ProcessGroup | None = None,
        **kw: Any,
    ):
        super().__init__(params, *args, **kw)
        # Attributes, not param_groups entries: checkpoints keep torch.optim.Muon's layout.
        self.ns_dtype = ns_dtype
        self.process_group = process_group

    # Replaced in tests to see which rank orthogonalised what: (N, rows, cols) -> the same.
    @staticmethod
    def orthogonalize(stacked: Tensor, group: dict[str, Any], dtype: torch.dtype) -> Tensor:
        """Muon's Newton-Schulz iteration of a batch, with ``group``'s coefficients, steps and
        eps, in ``dtype``."""
        return newton_schulz(
            stacked, group["ns_coefficients"], group["ns_steps"], group["eps"], dtype
        )

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            bufs: list[Tensor] = []
            # torch's own: the checks (complex, sparse) and the momentum_buffer it creates.
            self._init_group(group, params, grads, bufs)
            if params:
                self._update(group, params, grads, bufs, found_inf, grad_scale)
        return loss

    def _ns_dtype(self, device: torch.device) -> torch.dtype:
        return self.ns_dtype or default_dtype(device)

    def _update(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        bufs: list[Tensor],
        found_inf: Tensor | None,
        grad_scale: Tensor | None,
    ) -> None:
        momentum = group["momentum"]
        lr = float(group["lr"])
        # Elementwise work runs on each rank's local part (all of it without FSDP).
        ps, gs, bs = ([local(t) for t in ts] for ts in (params, grads, bufs))
        if grad_scale is not None:  # GradScaler did not unscale them: not in place, as fused Adam
            gs = list(torch._foreach_div(gs, grad_scale.to(gs[0].device)))
        skip = None
        if found_inf is not None:
            skip = found_inf.to(gs[0].device) != 0  # 0-d bool, never read on the host
            # A skipped step's gradients (non-finite) are replaced by the momentum buffers: the
            # lerp below then leaves each buffer exactly as it was, and the update is finite
            # (multiplied by 0 before it is applied).
            gs = [torch.where(skip, b, g) for g, b in zip(gs, bs, strict=True)]
        torch._foreach_lerp_(bs, gs, 1 - momentum)
        updates = list(torch._foreach_lerp(gs, bs, momentum)) if group["nesterov"] else bs
        # Launch every batch first (their collectives overlap the next batch's iteration), then
        # apply them in order.
        launched = [
            (members, self._orthogonalize_batch(group, members, params, updates))
            for members in matrix_batches(params, self._batch_key, _split(group))
        ]
        advanced = [(members, pending()) for members, pending in launched]
        keep = None if skip is None else (~skip).float()  # 1 = apply, 0 = skipped
        for members, finish in advanced:
            results = finish()
            batch = [ps[i] for i in members]
            device = batch[0].device
            # Made on the device (a fill, no host-to-device copy), and a tensor, not a float:
            # foreach rounds a float factor to a bf16 parameter's dtype first, where torch's
            # param.mul_(float) multiplies in float32.
            decay = torch.full((), 1 - lr * group["weight_decay"], device=device)
            if skip is not None and keep is not None:
                decay = decay.masked_fill(skip.to(device), 1)
                torch._foreach_mul_(results, keep.to(device))  # finite, so 0 * it is 0
            torch._foreach_mul_(batch, decay)
            shape = matrix_shape(params[members[0]].shape, _split(group))
            step_lr = adjusted_lr(lr, group["adjust_lr_fn"], shape)
            shaped = [r.reshape(p.shape) for r, p in zip(results, batch, strict=True)]
            torch._foreach_add_(batch, shaped, alpha=-step_lr)

    def _batch_key(self, param: Tensor) -> object:
        """What else must agree for parameters to share a batch (a sharded subclass: the
        placement)."""
        return None

    def _orthogonalize_batch(
        self, group: dict[str, Any], members: list[int], params: list[Tensor], updates: list[Tensor]
    ) -> Pending:
        """Start orthogonalising ``updates[i]`` for ``i`` in ``members`` (parameters of one
        trailing 2-D shape, each a stack of its matrices); the returned call finishes it."""
        mats = [updates[i] for i in members]
        rows, cols = matrix_shape(mats[0].shape, _split(group))
        stacked = torch.cat([m.reshape(-1, rows, cols) for m in mats])  # (N, rows, cols)
        dtype = self._ns_dtype(stacked.device)
        pg = self.process_group
        world = dist.get_world_size(pg) if pg is not None else 1
        if world == 1:
            return _ready(_split_like(self.orthogonalize(stacked, group, dtype), mats))
        rank = dist.get_rank(pg)
        n = stacked.shape[0]
        share = math.ceil(n / world)  # matrices per rank; the last ranks' shares are padding
        mine = stacked[rank * share : min(n, (rank + 1) * share)]
        out = torch.zeros(share, rows, cols, dtype=dtype, device=stacked.device)
        if mine.shape[0]:
            out[: mine.shape[0]] = self.orthogonalize(mine, group, dtype)
        gathered = torch.empty(world * share, rows, cols, dtype=dtype, device=stacked.device)
        work = _all_gather(gathered, out, group=pg, async_op=True)

        def finish() -> list[Tensor]:
            assert work is not None
            work.wait()
            return _split_like(gathered[:n], mats)

        return lambda: finish


def _split(group: dict[str, Any]) -> int:
    """The group's ``split_rows``: matrices per (rows, cols) slice (2 for a fused gate|up)."""
    return int(group.get("split_rows", 1))


# torch 2.13 renamed all_gather_into_tensor (still there, deprecated); 2.11 has only the old name.
_all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


def _ready(results: list[Tensor]) -> Pending:
    return lambda: lambda: results


def _split_like(stacked: Tensor, mats: list[Tensor]) -> list[Tensor]:
    """``stacked`` (N, rows, cols) cut back into one piece per tensor of ``mats``, each shaped
    like it."""
    sizes = [m.numel() // (stacked.shape[-2] * stacked.shape[-1]) for m in mats]
    return [s.reshape(m.shape) for s, m in zip(torch.split(stacked, sizes), mats, strict=True)]
