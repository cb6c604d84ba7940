"""Muon for FSDP2-sharded (DTensor) matrices: each matrix orthogonalised once, on one rank.

torch.optim.Muon runs on a DTensor shard too, but then every matmul of its Newton-Schulz loop
is a distributed bf16 matmul (15 redistributions per matrix per step, results off by bf16
rounding from the unsharded run). Gathering every matrix on every rank instead repeats the
whole Newton-Schulz work world_size times. Here (nanochat's scheme) the matrices are dealt out
round-robin: in each round every rank owns at most one matrix, receives its row shards
(``gather``), orthogonalises it, and sends each rank its rows back (``scatter``). The
momentum buffer stays sharded, and the arithmetic is that of torch's ``_single_tensor_muon``,
so a sharded run matches one process to float tolerance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from optim.batched_muon import MatrixBatchMuon
from optim.muon_math import adjusted_lr, as_matrices, default_dtype, matrix_shape, newton_schulz


def orthogonalize(update: Tensor, group: dict[str, Any]) -> Tensor:
    """Muon's Newton-Schulz orthogonalisation of a 2-D ``update``, or of each matrix of a 3-D one
    (:func:`optim.muon_math.as_matrices`), with ``group``'s coefficients, steps and eps, in the
    dtype one process uses on that device (BatchedMuon's), so a sharded run matches one process."""
    out = newton_schulz(
        as_matrices(update, int(group.get("split_rows", 1))),
        group["ns_coefficients"],
        group["ns_steps"],
        group["eps"],
        default_dtype(update.device),
    )
    return out.reshape(update.shape)


def _row_shards(rows: int, world: int) -> list[int]:
    """Rows held by each rank under ``Shard(0)``: torch.chunk's split (the last ranks may hold
    fewer rows, or none)."""
    chunk = -(-rows // world)
    return [max(0, min(chunk, rows - r * chunk)) for r in range(world)]


def _is_row_sharded(param: Tensor) -> bool:
    return (
        isinstance(param, DTensor)
        and param.device_mesh.ndim == 1
        and tuple(param.placements) == (Shard(0),)
    )


class ShardedMuon(MatrixBatchMuon):
    """torch.optim.Muon for FSDP2 parameters (same state layout: ``momentum_buffer`` per
    parameter, a DTensor shaped like it), each matrix's Newton-Schulz run by one owning rank.
    Parameters that are not row-sharded DTensors (another mesh, or plain tensors) are
    orthogonalised whole on every rank, as torch.optim.Muon does. A 3-D parameter (a layer's
    experts, ``Shard(0)`` over the experts) is a batch of whole matrices on each rank: each rank
    orthogonalises its own, with no collective."""

    # Replaced in tests to see which rank orthogonalised which matrix.
    orthogonalize: Callable[[Tensor, dict[str, Any]], Tensor] = staticmethod(orthogonalize)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            updates = [self._momentum_update(p, group) for p in params]
            sharded = [i for i, p in enumerate(params) if _is_row_sharded(p) and p.ndim == 2]
            ortho: dict[int, Tensor] = {}
            world = params[sharded[0]].device_mesh.size() if sharded else 1
            for start in range(0, len(sharded), world):  # a round: one matrix per rank at most
                ortho.update(self._round(sharded[start : start + world], params, updates, group))
            for i, (param, update) in enumerate(zip(params, updates, strict=True)):
                shape = matrix_shape(param.shape, int(group.get("split_rows", 1)))
                lr = adjusted_lr(group["lr"], group["adjust_lr_fn"], shape)
                local = param.to_local() if isinstance(param, DTensor) else param
                if param.ndim == 3 and _is_row_sharded(param):  # this rank's whole experts
                    assert isinstance(update, DTensor)
                    ortho[i] = self.orthogonalize(update.to_local(), group)
                if i not in ortho:  # not row-sharded: orthogonalise the whole matrix here
                    whole = update.full_tensor() if isinstance(update, DTensor) else update
                    ortho[i] = self.orthogonalize(whole, group)
                    if isinstance(param, DTensor):
                        ortho[i] = distribute_tensor(
                            ortho[i], param.device_mesh, param.placements, src_data_rank=None
                        ).to_local()
                local.mul_(1 - group["lr"] * group["weight_decay"])
                local.add_(ortho[i].to(local.dtype), alpha=-lr)
        return loss

    def _momentum_update(self, param: Tensor, group: dict[str, Any]) -> Tensor:
        """This rank's part of the (Nesterov) momentum update; elementwise, so shards suffice."""
        grad = param.grad
        assert grad is not None
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        buf = state["momentum_buffer"]
        buf.lerp_(grad, 1 - group["momentum"])
        return grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf

    def _round(
        self, which: list[int], params: list[Tensor], updates: list[Tensor], group: dict[str, Any]
    ) -> dict[int, Tensor]:
        """Orthogonalise ``params[which[j]]`` on the mesh's rank j; return this rank's rows of
        each one's result (local tensors, keyed by index)."""
        first = params[which[0]]
        assert isinstance(first, DTensor)
        pg = first.device_mesh.get_group()
        me, world = dist.get_rank(pg), dist.get_world_size(pg)
        # Shards are padded to torch.chunk's chunk size: gather and scatter move equal blocks.
        shards = {i: _row_shards(params[i].shape[0], world) for i in which}

        def padded(local: Tensor, rows: int) -> Tensor:
            return torch.nn.functional.pad(local, (0, 0, 0, rows - local.shape[0]))

        gathered: dict[int, list[Tensor]] = {}
        works = []
        for owner, i in enumerate(which):
            update = updates[i]
            assert isinstance(update, DTensor)
            local = update.to_local()
            chunk = max(shards[i])
            dst = dist.get_global_rank(pg, owner)
            if owner == me:
                gathered[i] = [torch.empty_like(padded(local, chunk)) for _ in range(world)]
            works.append(
                dist.gather(
                    padded(local, chunk).contiguous(),
                    gathered.get(i),
                    dst=dst,
                    group=pg,
                    async_op=True,
                )
            )
        for w in works:
            assert w is not None
            w.wait()
        results: dict[int, Tensor] = {}
        works = []
        for owner, i in enumerate(which):
            chunk, rows = max(shards[i]), shards[i]
            pieces: list[Tensor] | None = None
            if owner == me:
                whole = torch.cat([g[:n] for g, n in zip(gathered.pop(i), rows, strict=True)])
                # in the update's dtype: every rank can size its receive buffer from its own shard
                out = self.orthogonalize(whole, group).to(updates[i].dtype)
                pieces = [padded(p, chunk).contiguous() for p in torch.split(out, rows)]
            results[i] = torch.empty(
                chunk, params[i].shape[1], dtype=updates[i].dtype, device=updates[i].device
            )
            src = dist.get_global_rank(pg, owner)
            works.append(dist.scatter(results[i], pieces, src=src, group=pg, async_op=True))
        for w in works:
            assert w is not None
            w.wait()
        return {i: results[i][: shards[i][me]] for i in which}
