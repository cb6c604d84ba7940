"""Muon for FSDP2-sharded (DTensor) matrices: each matrix orthogonalised once, on one rank, with
one exchange per matrix shape (per chunk of CHUNK_BYTES, optim/batched_muon.py) per step.

torch.optim.Muon runs on a DTensor shard too, but then every matmul of its Newton-Schulz loop
is a distributed bf16 matmul (15 redistributions per matrix per step, results off by bf16
rounding from the unsharded run). Gathering every matrix on every rank instead repeats the
whole Newton-Schulz work world_size times. Here the matrices of one shape (a batch, as in
optim/batched_muon.py) are dealt out in equal shares: one ``all_to_all`` sends each owner the
row shards of its share, the owner iterates on its share as one batch, and a second
``all_to_all`` sends every rank its rows of every result. Both move the iteration's dtype (bf16 on
GPUs, the dtype the iteration casts to first anyway), so the result is one process's bit for
bit. A chunk's exchange is started before the previous chunk's is waited on, so one transfer
overlaps another's iteration (at most three chunks in flight, which bounds the buffers).

A parameter sharded along a leading stack dimension (an MoE layer's ``(E, out, in)`` experts under
``Shard(0)``) holds whole matrices on each rank: those are orthogonalised where they are, with no
exchange at all. Momentum, weight decay and the update are elementwise and run on the local
shards (``BatchedMuon._update``); the state layout is torch.optim.Muon's (``momentum_buffer`` per
parameter, a DTensor shaped like it).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from optim.batched_muon import BatchedMuon, Finish, Pending, _ready, _split, _split_like
from optim.muon_math import matrix_shape


def _row_shards(rows: int, world: int) -> list[int]:
    """Rows held by each rank under ``Shard(0)``: torch.chunk's split (the last ranks may hold
    fewer rows, or none)."""
    chunk = -(-rows // world)
    return [max(0, min(chunk, rows - r * chunk)) for r in range(world)]


def _placement(param: Tensor) -> str:
    """How a parameter is laid out: "rows" (a matrix sharded by rows: exchanged), "stack" (a stack
    of matrices sharded along its first dimension: local), or "whole" (anything else)."""
    if not isinstance(param, DTensor):
        return "whole"
    if param.device_mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
        return "whole"
    return "rows" if param.ndim == 2 else "stack"


class ShardedMuon(BatchedMuon):
    """torch.optim.Muon for FSDP2 parameters, each matrix's Newton-Schulz run by one rank.
    Parameters that are neither row-sharded matrices nor stacks sharded along their first
    dimension (another mesh, or plain tensors) are orthogonalised whole on every rank, as
    torch.optim.Muon does."""

    def _batch_key(self, param: Tensor) -> object:
        if not isinstance(param, DTensor):
            return ("whole",)
        return (_placement(param), param.device_mesh, tuple(param.placements))

    def _whole_matrices(self, param: Tensor) -> bool:
        return _placement(param) == "stack" or not isinstance(param, DTensor)

    def _orthogonalize_batch(
        self, group: dict[str, Any], owners: list[Tensor], updates: list[Tensor]
    ) -> Pending:
        first = owners[0]
        placement = _placement(first)
        if placement == "rows":  # local row shards of 2-D matrices: one per (rows, cols)
            assert isinstance(first, DTensor) and _split(group) == 1
            return self._exchange(group, first, updates)
        if placement == "stack" or not isinstance(first, DTensor):
            # whole matrices on every rank: iterate where they are
            return super()._orthogonalize_batch(group, owners, updates)
        # Whole on every rank, then each rank keeps its own part.
        dtensors = [p for p in owners if isinstance(p, DTensor)]  # all of them (the batch key)
        wholes = [
            DTensor.from_local(
                u, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
            ).full_tensor()
            for u, p in zip(updates, dtensors, strict=True)
        ]
        rows, cols = matrix_shape(first.shape, _split(group))
        stacked = torch.cat([w.reshape(-1, rows, cols) for w in wholes])
        out = _split_like(
            self.orthogonalize(stacked, group, self._ns_dtype(stacked.device)), wholes
        )
        return _ready(
            [
                distribute_tensor(o, p.device_mesh, p.placements, src_data_rank=None).to_local()
                for o, p in zip(out, dtensors, strict=True)
            ]
        )

    def _exchange(self, group: dict[str, Any], first: DTensor, shards: list[Tensor]) -> Pending:
        """Orthogonalise the row-sharded matrices whose local row shards are ``shards`` (all
        of ``first``'s global shape): rank r owns the r-th equal share of them."""
        pg = first.device_mesh.get_group()
        me, world = dist.get_rank(pg), dist.get_world_size(pg)
        rows, cols = first.shape
        counts = _row_shards(rows, world)
        chunk = max(counts)
        n = len(shards)
        share = math.ceil(n / world)
        device = shards[0].device
        dtype = self._ns_dtype(device)
        # (world * share, chunk, cols): this rank's rows of every matrix, zero-padded to the chunk
        # size (and to whole shares), so that both all_to_alls move equal blocks.
        send = torch.zeros(world * share, chunk, cols, dtype=dtype, device=device)
        for i, s in enumerate(shards):
            send[i, : s.shape[0]] = s
        recv = torch.empty_like(send)  # [j * share + m]: rank j's rows of my m-th matrix
        there = dist.all_to_all_single(recv, send, group=pg, async_op=True)
        back = torch.empty_like(send)

        def advance() -> Finish:
            assert there is not None
            there.wait()
            mine = min(share, max(0, n - me * share))  # the real matrices of my share
            whole = recv.view(world, share, chunk, cols).transpose(0, 1).reshape(share, -1, cols)
            out = torch.zeros(share, world * chunk, cols, dtype=dtype, device=device)
            if mine:
                out[:mine, :rows] = self.orthogonalize(whole[:mine, :rows], group, dtype)
            # [j * share + m]: rank j's rows of my m-th result
            pieces = out.view(share, world, chunk, cols).transpose(0, 1).contiguous()
            work = dist.all_to_all_single(back, pieces.view_as(send), group=pg, async_op=True)

            def finish() -> list[Tensor]:
                assert work is not None
                work.wait()
                return [back[i, : counts[me]] for i in range(n)]

            return finish

        return advance
