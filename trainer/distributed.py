"""Several processes: the process group ``torchrun`` ties together, collectives, and the model's
wrapping for them (DistributedDataParallel, or FSDP2 sharding).

``torchrun`` sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; a plain
``python train.py`` sets none of them and runs as rank 0 of 1 without a process group. The
collectives below are no-ops then, so single-process code paths call them unconditionally.
``torchrun --nproc_per_node=1`` forms no group either, unless ``trainer.force_process_group``
asks for one: a group of one rank then takes the multi-process path (FSDP2 sharding, sharded
Muon, DTensor clipping, DCP with DTensors, NCCL on a GPU), so one GPU can check it.

Wrapping: one process trains the model as is. Several, ``trainer.fsdp=false``: every rank holds
the whole model and DDP all-reduces (averages) the gradients in buckets during ``backward``.
``trainer.fsdp=true``: ``fully_shard`` makes each decoder layer its own shard group (all-gathered
just before it runs, freed after) and the root holds the rest (the embedding, tied to the LM
head, and the final norm). Parameters become DTensors sharded along their first dimension;
optimizers step on the local shards. Checkpoints: each rank writes and reads its own shards of
the weights and optimizer state (trainer/train_state.py), and the Hugging Face export in every
checkpoint is gathered to rank 0 one tensor at a time (qwen3/hf.py).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from qwen3 import Qwen3
from qwen3.checkpointing import ActivationCheckpointing
from qwen3.compile import compile_for_training
from trainer.errors import LaunchError

T = TypeVar("T")
_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class DistInfo:
    """Rank of this process among ``world_size`` (``local_rank`` on its machine); only rank 0
    writes files and logs."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    grouped: bool = False  # in a process group (torchrun; also one rank when forced)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """Whether this process trains as one rank of a group (DDP or FSDP2, collectives):
        two or more processes, or one forced into a group (``trainer.force_process_group``)."""
        return self.world_size > 1 or self.grouped


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise LaunchError(
            f"{name}={value!r} is not a whole number; launch multi-process runs with torchrun, "
            "which sets RANK, LOCAL_RANK and WORLD_SIZE"
        ) from None


def under_torchrun() -> bool:
    """Whether a launcher (torchrun) set this process's rank and rendezvous."""
    return all(name in os.environ for name in (*_ENV, "MASTER_ADDR", "MASTER_PORT"))


def dist_info() -> DistInfo:
    """This process's place in the run, from the environment ``torchrun`` sets."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise LaunchError(
            f"RANK={rank}, LOCAL_RANK={local_rank}, WORLD_SIZE={world_size} do not describe a "
            "process of a run; launch with torchrun --nproc_per_node=N train.py ..."
        )
    return DistInfo(rank, world_size, local_rank, grouped=dist.is_initialized())


DEFAULT_TIMEOUT_S = 1800.0  # trainer.dist_timeout's default: a collective waits at most this


def init_process_group(
    info: DistInfo, timeout_s: float = DEFAULT_TIMEOUT_S, force: bool = False
) -> None:
    """Join the run's process group (``torchrun``'s env:// rendezvous); no-op for one process
    unless ``force`` (a group of one, launched by ``torchrun --nproc_per_node=1``).

    CPU tensors always go through gloo; where CUDA is available, this process takes GPU
    ``LOCAL_RANK`` and CUDA tensors go through NCCL (one group serves both devices), bound to
    that GPU (``device_id``: NCCL's communicator is made now and no collective has to guess the
    device). A collective that waits longer than ``timeout_s`` fails instead of hanging.
    """
    if dist.is_initialized() or not (info.world_size > 1 or force):
        return
    if not under_torchrun():
        raise LaunchError(
            "trainer.force_process_group=true needs the rendezvous torchrun sets up; launch "
            "with torchrun --standalone --nproc_per_node=1 train.py ..."
        )
    timeout = timedelta(seconds=timeout_s)
    if torch.cuda.is_available():
        if info.local_rank >= torch.cuda.device_count():
            raise LaunchError(
                f"LOCAL_RANK={info.local_rank} but this machine has {torch.cuda.device_count()} "
                "GPUs; start at most one process per GPU (torchrun --nproc_per_node)"
            )
        gpu = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(gpu)
        dist.init_process_group(backend="cpu:gloo,cuda:nccl", timeout=timeout, device_id=gpu)
    else:
        dist.init_process_group(backend="gloo", timeout=timeout)


def shutdown(wait_for_others: bool = True) -> None:
    """Leave the process group, after a barrier (so no rank exits while another still talks)
    unless this process is failing (then torchrun stops the others). Call it after the last
    collective, before any work that only rank 0 does (its summary, wandb's upload), so that no
    rank waits in the barrier on that work; later calls are no-ops."""
    if dist.is_initialized():
        if wait_for_others:
            dist.barrier()
        dist.destroy_process_group()


def local_device(device: torch.device, info: DistInfo) -> torch.device:
    """``cuda`` without an index means this process's own GPU, ``cuda:LOCAL_RANK``."""
    if device.type == "cuda" and device.index is None and info.is_distributed:
        return torch.device("cuda", info.local_rank)
    return device


def rank_seed(seed: int, info: DistInfo) -> int:
    """The seed of what must differ across data-parallel ranks (dropout masks): ``seed`` on
    rank 0, offset on the others. What must match (the initial weights, the batch sampler,
    sampling at the end of a sharded run) keeps the run's ``seed``."""
    return seed + 1_000_003 * info.rank  # a prime stride: no two ranks of nearby seeds collide


def _active() -> bool:
    return dist.is_initialized()


def barrier() -> None:
    if _active():
        dist.barrier()


def background_group() -> dist.ProcessGroup | None:
    """A gloo group of all ranks for work in a background thread (an asynchronous checkpoint's
    coordination), so it never interleaves with the training's collectives on the default
    group; None in one process. Collective: every rank calls it."""
    return dist.new_group(backend="gloo") if _active() else None


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


def all_reduce_sum_(tensor: torch.Tensor) -> None:
    """Sum ``tensor`` over all ranks in place, on its own device (NCCL for CUDA tensors: the host
    does not wait for it); no-op in one process."""
    if _active():
        dist.all_reduce(tensor)


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


def all_ranks(value: T) -> list[T]:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
    if not _active():
        return [value]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out  # type: ignore[return-value]


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


def wrap_model(
    model: Qwen3,
    dist: DistInfo,
    device: torch.device,
    fsdp: bool,
    compile: bool,
    activation_checkpointing: ActivationCheckpointing = "none",
    low_precision: torch.dtype | None = None,
) -> nn.Module:
    """What the training step calls. ``model`` is sharded in place when ``fsdp``; build the
    optimizers after this call, on ``model``'s (then sharded) parameters. ``low_precision``
    (bf16 training) is the dtype FSDP gathers parameters in; gradients are still reduced in
    float32 and the sharded weights stay float32.

    torchtitan's order: activation checkpointing inside each block first, then ``compile`` block
    by block (``qwen3.compile``: one graph per block, the checkpointed region inside it), then
    sharding or replication, so FSDP's per-block gathers stay outside the recomputed region and
    the compiled graphs.
    """
    model.set_activation_checkpointing(activation_checkpointing)
    if compile:
        compile_for_training(model)
    forward: nn.Module = model
    if fsdp and not dist.is_distributed:
        warnings.warn(
            "trainer.fsdp=true in a single process: nothing to shard across, training unsharded; "
            "launch with torchrun --nproc_per_node=N to shard",
            stacklevel=2,
        )
    elif fsdp:
        shard_model(model, device, low_precision)
    elif dist.is_distributed:
        forward = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            **_NO_BUFFER_SYNC,
        )
    return forward


# DDP broadcasts buffers from rank 0 before each forward unless told not to; ours are only RoPE
# tables, the same on every rank. ``forward_sync_buffers`` is newer than torch 2.11, which has
# only ``broadcast_buffers`` (off also skips the initial broadcast: the same tables there too).
_NO_BUFFER_SYNC: dict[str, Any] = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Under DDP, ``backward`` within this context only accumulates local gradients when
    ``enabled`` is false (the non-final micro-batches of gradient accumulation), so the ranks
    all-reduce once per optimizer step.

    Under FSDP every micro-batch's gradients are reduce-scattered: skipping that sync would keep
    each rank's full, unsharded float32 gradients alive across the micro-batches (a whole
    model's worth per rank, what sharding exists to avoid), while one reduce-scatter per
    micro-batch leaves each rank 1/world of them. Memory wins over the extra communication
    (measured in benchmarks/results/fsdp-memory.md)."""
    if not enabled and isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        yield


_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_model(
    model: Qwen3, device: torch.device, low_precision: torch.dtype | None = None
) -> None:
    """Shard ``model`` in place: one FSDP group per decoder layer, plus the root. With
    ``low_precision`` the per-layer all-gathers move (and the forward computes with) parameters
    in that dtype, half of float32's traffic and memory; reduce-scatters stay float32 so the
    sharded float32 weights and optimizer state see exact gradient sums."""
    mesh_device = "cuda" if device.type == "cuda" else "cpu"
    mesh = torch.distributed.device_mesh.init_device_mesh(
        mesh_device, (torch.distributed.get_world_size(),)
    )
    policy = MixedPrecisionPolicy(param_dtype=low_precision, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_model_copy(model: Qwen3, is_main: bool) -> Qwen3 | None:
    """The whole model as a plain module on rank 0's CPU (None elsewhere). Collective: every
    rank must call it."""
    state = get_model_state_dict(model, options=_GATHER)
    if not is_main:
        return None
    with torch.device("meta"):
        plain = Qwen3(model.config)
    plain.to_empty(device="cpu")
    plain.model.rotary_emb.reset()
    if model.config.tie_word_embeddings:
        plain.lm_head.weight = plain.model.embed_tokens.weight
    plain.load_state_dict(state, strict=False)
    missing = {n for n, _ in plain.named_parameters()} - set(state)
    if missing:
        raise RuntimeError(f"gathered state dict lacks {sorted(missing)[:3]}")
    return plain
