"""torch.optim.Muon with the Newton-Schulz iteration run once per matrix shape, over a batch, the
skip of a non-finite step decided on the device, and (under DDP) the iteration split across ranks.

torch.optim.Muon orthogonalises its matrices one at a time, always in bf16. Here the matrices of
one shape are stacked into one ``(N, rows, cols)`` tensor and iterated with batched matmuls
(optim/muon_math.py), in float32 on CPU, where bf16 matmuls are emulated and far slower
(benchmarks/results/muon.md), bf16 elsewhere as torch does; momentum, weight decay and the update
run as ``torch._foreach_*`` ops over the batch. A parameter of more than two dimensions
(an MoE layer's ``(E, out, in)`` experts) joins the batch of its trailing 2-D shape as its
``E`` slices, each orthogonalised on its own (:func:`optim.muon_math.matrix_batches`). A batch
larger than ``CHUNK_BYTES`` runs as several chunks, each from momentum to update in place, so the
step's transient memory is bounded by the chunk, not by the largest shape's batch (an expert
stack may be cut between experts); the results are the same bit for bit.

Under DDP every rank holds the same averaged gradients, so every rank would run the same whole
iteration. With ``process_group`` each rank orthogonalises its share of every shape's batch and
the results are all-gathered, one collective per chunk per step (so one per shape for shapes
under CHUNK_BYTES), in the dtype the iteration produced (bf16 on GPUs, so half of float32's
bytes; float32 on CPU, where the iteration runs in float32 and a bf16 exchange would make the
ranks' weights differ from one process's).

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
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

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

# The most bytes of matrices one chunk of a shape's batch stacks for the iteration (in the larger
# of the parameters' and the iteration's dtype). A step's transient memory is a small multiple
# of it (benchmarks/results/muon.md) instead of the largest shape's whole batch: qwen3-30b-a3b's
# expert matrices of one shape are tens of GB. Public: memory plans read it.
CHUNK_BYTES = 512 * 2**20


class Piece(NamedTuple):
    """Matrices ``start:stop`` of parameter ``param`` (an index) (its local part): a slice of its
    ``(N, rows, cols)`` view, or, with ``stop`` None, the local part as it is."""

    param: int
    start: int
    stop: int | None

    def of(self, t: Tensor, split: int) -> Tensor:
        """This piece of ``t`` (the parameter's local part, or its gradient or buffer): a view,
        so writes reach ``t``."""
        if self.stop is None:
            return t
        rows, cols = matrix_shape(t.shape, split)
        return t.view(t.numel() // (rows * cols), rows, cols)[self.start : self.stop]


@dataclass(frozen=True)
class Chunk:
    """Pieces orthogonalised as one batch, with what their update needs."""

    pieces: list[Piece]
    split: int  # the group's split_rows
    decay: Tensor  # 0-d, on the parameters' device: 1 - lr * weight_decay (1 on a skipped step)
    step_lr: float  # the shape-adjusted learning rate


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
        lr = float(group["lr"])
        split = _split(group)
        # Elementwise work runs on each rank's local part (all of it without FSDP).
        ps, gs, bs = ([local(t) for t in ts] for ts in (params, grads, bufs))
        device = gs[0].device
        scale = None if grad_scale is None else grad_scale.to(device)
        skip = None if found_inf is None else found_inf.to(device) != 0  # 0-d, never read
        keep = None if skip is None else (~skip).float()  # 1 = apply, 0 = skipped
        # A chunk at a time, from momentum to update (so no step-sized temporary exists), at
        # most three in flight: one started (its collective maybe under way), one advanced,
        # one being applied; a chunk's transfers overlap the next one's iteration.
        started: deque[tuple[Chunk, Pending]] = deque()
        advanced: deque[tuple[Chunk, Finish]] = deque()
        for members in matrix_batches(params, self._batch_key, split):
            first = params[members[0]]
            step_lr = adjusted_lr(lr, group["adjust_lr_fn"], matrix_shape(first.shape, split))
            # Made on the device (a fill, no host-to-device copy), and a tensor, not a float:
            # foreach rounds a float factor to a bf16 parameter's dtype first, where torch's
            # param.mul_(float) multiplies in float32.
            decay = torch.full((), 1 - lr * group["weight_decay"], device=ps[members[0]].device)
            if skip is not None:
                decay = decay.masked_fill(skip.to(decay.device), 1)
            for pieces in self._chunks(group, members, params, ps):
                chunk = Chunk(pieces, split, decay, step_lr)
                updates = self._momentum(group, pieces, gs, bs, scale, skip)
                owners = [params[p.param] for p in pieces]
                started.append((chunk, self._orthogonalize_batch(group, owners, updates)))
                if len(started) > 1:
                    done, pending = started.popleft()
                    advanced.append((done, pending()))
                if len(advanced) > 1:
                    self._apply(*advanced.popleft(), ps, keep)
        advanced.extend((done, pending()) for done, pending in started)
        for done, finish in advanced:
            self._apply(done, finish, ps, keep)

    def _chunks(
        self, group: dict[str, Any], members: list[int], params: list[Tensor], ps: list[Tensor]
    ) -> Iterator[list[Piece]]:
        """``members`` (one batch) cut into chunks of at most CHUNK_BYTES of matrices (at
        least one matrix each), in the larger of the parameters' and the iteration's dtype.
        A member whose local part holds whole matrices (:meth:`_whole_matrices`) may be cut
        between its matrices; any other goes whole into one chunk."""
        rows, cols = matrix_shape(params[members[0]].shape, _split(group))
        size = max(ps[members[0]].element_size(), self._ns_dtype(ps[members[0]].device).itemsize)
        most = max(1, CHUNK_BYTES // (rows * cols * size))  # matrices per chunk
        pieces: list[Piece] = []
        held = 0
        for i in members:
            if not self._whole_matrices(params[i]):  # its global matrices, never cut
                count = params[i].numel() // (rows * cols)
                if pieces and held + count > most:
                    yield pieces
                    pieces, held = [], 0
                pieces.append(Piece(i, 0, None))
                held += count
                continue
            n = ps[i].numel() // (rows * cols)
            start = 0
            while start < n:
                if held == most:
                    yield pieces
                    pieces, held = [], 0
                stop = min(n, start + most - held)
                pieces.append(Piece(i, start, stop))
                held += stop - start
                start = stop
        if pieces:
            yield pieces

    def _whole_matrices(self, param: Tensor) -> bool:
        """Whether this rank's part of ``param`` is a stack of whole matrices (so a chunk may
        hold some of them): always, for plain tensors."""
        return True

    def _momentum(
        self,
        group: dict[str, Any],
        pieces: list[Piece],
        gs: list[Tensor],
        bs: list[Tensor],
        scale: Tensor | None,
        skip: Tensor | None,
    ) -> list[Tensor]:
        """torch.optim.Muon's momentum step on ``pieces``, in place on their buffers; returns
        the updates to orthogonalise (the buffers themselves without nesterov)."""
        split = _split(group)
        momentum = group["momentum"]
        g = [p.of(gs[p.param].contiguous(), split) for p in pieces]
        b = [p.of(bs[p.param], split) for p in pieces]
        if scale is not None:  # GradScaler did not unscale them: not in place, as fused Adam
            g = list(torch._foreach_div(g, scale))
        if skip is not None:
            # A skipped step's gradients (non-finite) are replaced by the momentum buffers: the
            # lerp below then leaves each buffer exactly as it was, and the update is finite
            # (multiplied by 0 before it is applied).
            g = [torch.where(skip, bb, gg) for gg, bb in zip(g, b, strict=True)]
        torch._foreach_lerp_(b, g, 1 - momentum)
        return list(torch._foreach_lerp(g, b, momentum)) if group["nesterov"] else b

    def _apply(self, chunk: Chunk, finish: Finish, ps: list[Tensor], keep: Tensor | None) -> None:
        """Weight decay and the orthogonalised update, in place on the chunk's parameters."""
        results = finish()
        batch = [p.of(ps[p.param], chunk.split) for p in chunk.pieces]
        if keep is not None:
            torch._foreach_mul_(results, keep.to(chunk.decay.device))  # finite, so 0 * it is 0
        torch._foreach_mul_(batch, chunk.decay)
        torch._foreach_add_(batch, results, alpha=-chunk.step_lr)

    def _batch_key(self, param: Tensor) -> object:
        """What else must agree for parameters to share a batch (a sharded subclass: the
        placement)."""
        return None

    def _orthogonalize_batch(
        self, group: dict[str, Any], owners: list[Tensor], updates: list[Tensor]
    ) -> Pending:
        """Start orthogonalising one chunk: ``updates``, each an ``(n, rows, cols)`` stack of
        matrices of the parameter beside it in ``owners`` (or, where a subclass keeps members
        whole, a member's local part); the returned call finishes it, a result shaped like
        each update."""
        rows, cols = matrix_shape(owners[0].shape, _split(group))
        # (N, rows, cols); one piece is iterated where it is (the iteration never writes to it)
        stacked = updates[0] if len(updates) == 1 else torch.cat(updates)
        dtype = self._ns_dtype(stacked.device)
        pg = self.process_group
        world = dist.get_world_size(pg) if pg is not None else 1
        if world == 1:
            return _ready(_split_like(self.orthogonalize(stacked, group, dtype), updates))
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
            return _split_like(gathered[:n], updates)

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
