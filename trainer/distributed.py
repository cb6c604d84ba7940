"""Which process this is, and the process group that ties ``torchrun``'s processes together.

``torchrun`` sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; a plain
``python train.py`` sets none of them and runs as rank 0 of 1 without a process group. The
collectives below are no-ops then, so single-process code paths call them unconditionally.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class DistInfo:
    """Rank of this process among ``world_size`` (``local_rank`` on its machine); only rank 0
    writes files and logs."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(
            f"{name}={value!r} is not a whole number; launch multi-process runs with torchrun, "
            "which sets RANK, LOCAL_RANK and WORLD_SIZE"
        ) from None


def dist_info() -> DistInfo:
    """This process's place in the run, from the environment ``torchrun`` sets."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise RuntimeError(
            f"RANK={rank}, LOCAL_RANK={local_rank}, WORLD_SIZE={world_size} do not describe a "
            "process of a run; launch with torchrun --nproc_per_node=N train.py ..."
        )
    return DistInfo(rank, world_size, local_rank)


def init_process_group(info: DistInfo) -> None:
    """Join the run's process group (``torchrun``'s env:// rendezvous); no-op for one process.

    CPU tensors always go through gloo; where CUDA is available, this process takes GPU
    ``LOCAL_RANK`` and CUDA tensors go through NCCL (one group serves both devices).
    """
    if not info.is_distributed or dist.is_initialized():
        return
    if torch.cuda.is_available():
        if info.local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={info.local_rank} but this machine has {torch.cuda.device_count()} "
                "GPUs; start at most one process per GPU (torchrun --nproc_per_node)"
            )
        torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend="cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group(backend="gloo")


def shutdown(wait_for_others: bool = True) -> None:
    """Leave the process group, after a barrier (so no rank exits while another still talks)
    unless this process is failing (then torchrun stops the others)."""
    if dist.is_initialized():
        if wait_for_others:
            dist.barrier()
        dist.destroy_process_group()


def local_device(device: torch.device, info: DistInfo) -> torch.device:
    """``cuda`` without an index means this process's own GPU, ``cuda:LOCAL_RANK``."""
    if device.type == "cuda" and device.index is None and info.is_distributed:
        return torch.device("cuda", info.local_rank)
    return device


def _active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _active():
        dist.barrier()


def mean_across_ranks(value: float) -> float:
    """The mean of ``value`` over all ranks (equal batch sizes: the whole batch's mean)."""
    return sum_across_ranks([value])[0] / group_rank_world()[1]


def group_rank_world() -> tuple[int, int]:
    """(rank, world size) in the initialised process group, (0, 1) without one."""
    return (dist.get_rank(), dist.get_world_size()) if _active() else (0, 1)


def sum_across_ranks(values: list[float]) -> list[float]:
    """Element-wise sums of ``values`` over all ranks (float64, so counts stay exact)."""
    if not _active():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)  # on CPU (gloo): a few scalars are not worth a device round trip
    return [float(v) for v in t.tolist()]


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (so all ranks take the same branch)."""
    if not _active():
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def from_main(value: T) -> T:
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if not _active():
        return value
    box: list[object] = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def main_first(fn: Callable[[], T], what: str, error: type[Exception] = RuntimeError) -> T:
    """Run ``fn`` on rank 0, then on the other ranks (e.g. build a cache once, then load it).

    If rank 0 fails, the others raise ``error`` instead of waiting forever.
    """
    if not _active():
        return fn()
    if dist.get_rank() == 0:
        try:
            result = fn()
        except BaseException:
            from_main(False)
            raise
        from_main(True)
        return result
    if not from_main(False):
        raise error(f"rank 0 failed {what}; its message above says why")
    return fn()
