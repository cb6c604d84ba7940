"""Build a run's parts from its typed config: device and precision, data, model, optimizers,
sampler. Mixed precision keeps the weights in float32: autocast picks the compute dtype, and
fp16 adds a GradScaler."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import os
import random
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from data import BatchSampler, PreparedData, prepare_data, wait_for_data
from data.errors import DataError
from data.sft_data import SFTData
from data.sft_sampler import SFTSampler
from optim import OptimizerSet, build_optimizers
from qwen3 import Qwen3, Qwen3Config, pick_device
from qwen3.config import padded_vocab_size
from qwen3.device import cpu_has_native_bf16_matmul
from qwen3.hf import load_pretrained, load_sharded
from trainer.config import RunConfig
from trainer.distributed import DistInfo, from_main, rank_seed, wrap_model
from trainer.errors import ConfigError

if TYPE_CHECKING:
    from trainer.downstream_loop import DownstreamScorer


@dataclass
class RunParts:
    """Everything the loop works with."""

    device: torch.device
    precision: Precision
    data: PreparedData | SFTData  # token caches, or conversations (train.py sft)
    model: Qwen3  # the module itself (sharded in place under trainer.fsdp): saved, sampled from
    forward: (
        nn.Module
    )  # what training calls: ``model`` (blocks compiled in place), or its DDP wrapper
    optimizers: OptimizerSet
    sampler: BatchSampler | SFTSampler
    token_bytes: torch.Tensor  # (V,) each id's UTF-8 byte length, on ``device``: for val_bpb
    downstream: DownstreamScorer | None = None  # trainer.eval_tasks scored in the loop


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def apply_runtime_settings(cfg: RunConfig, device: torch.device) -> None:
    """Process-wide settings: CPU threads, flushing denormals on CPU (their softmax tails can
    make a step ~4x slower), glibc's ``malloc`` on CPU (under FSDP, a fixed mmap threshold:
    :func:`fix_malloc_mmap_threshold`; otherwise freed memory kept for reuse:
    :func:`retain_freed_memory`), and TF32 matmuls on CUDA unless ``trainer.tf32=false``
    (float32 runs, and the float32 parts of mixed precision, at tensor-core speed)."""
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    if device.type == "cpu":
        torch.set_flush_denormal(True)
        if cfg.trainer.fsdp:  # the mode chosen to save memory
            fix_malloc_mmap_threshold()
        else:
            retain_freed_memory()
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if cfg.trainer.tf32 else "highest")


# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
MALLOC_MMAP_THRESHOLD = 4 << 20
# Environment variables by which a user sets glibc's choices: then the trainer leaves them.
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")


def _mallopt(settings: dict[int, int]) -> bool:
    """glibc's ``mallopt`` for each (parameter, value); True if all were taken. Nothing is set
    when the user chose any of :data:`_MALLOC_ENV` or the C library is not glibc."""
    if sys.platform != "linux" or any(name in os.environ for name in _MALLOC_ENV):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl, for one, does not)
    except (OSError, AttributeError):
        return False
    return all([bool(libc.mallopt(param, value)) for param, value in settings.items()])


def fix_malloc_mmap_threshold(nbytes: int = MALLOC_MMAP_THRESHOLD) -> bool:
    """Have glibc's ``malloc`` serve every block of ``nbytes`` or more with its own mapping,
    returned to the system when freed; True if set.

    Why: glibc starts at 128 KiB and raises its threshold (up to 32 MiB) each time a mapped
    block is freed, so tensors of a few MiB soon come from the heap, whose freed holes it keeps
    resident; FSDP frees and re-gathers every block's weights each step, so its peak holds many
    such holes. The price is a page fault per page of every such tensor on every allocation,
    which steps whose activations pass 4 MiB pay, hence FSDP only (figures:
    benchmarks/results/fsdp-memory.md)."""
    return _mallopt({_M_MMAP_THRESHOLD: nbytes})


def retain_freed_memory() -> bool:
    """Have glibc's ``malloc`` keep what a step frees for the next one: no block gets a mapping
    of its own and the heap is never trimmed; True if set.

    Why: a training step allocates and frees tensors of the same sizes every step, and glibc
    maps blocks above its threshold (at most 32 MiB: a 100M model's embedding gradient, its
    optimizer's temporaries) afresh each time and returns the heap's free top to the system, so
    each step faults those pages in again (every page zeroed by the kernel). Kept, they are
    reused, as CUDA's caching allocator reuses its blocks; the price is peak RSS that includes
    the heap's free holes (figures: benchmarks/results/cpu-allocator.md)."""
    # -1 disables trimming (glibc's documented value; the parameter is unsigned inside).
    return _mallopt({_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: -1})


def resolve_device(cfg: RunConfig) -> tuple[torch.device, Precision]:
    """The device and precision, or a :class:`ConfigError` if they cannot be had here."""
    try:
        device = pick_device(cfg.trainer.device)
    except RuntimeError as e:
        raise ConfigError(f"trainer.device={cfg.trainer.device}: {e}") from None
    return device, resolve_precision(cfg.trainer.precision, device)


def check_optimizer_config(cfg: RunConfig) -> None:
    """Build the optimizers once on a weightless (meta) model, so an optimizer/schedule setting
    that does not fit the run fails before any data is read."""
    with torch.device("meta"):
        model = Qwen3(cfg.model)
    try:
        build_optimizers(model, cfg.optim, cfg.trainer.max_steps)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def model_config_for(cfg: Qwen3Config, data: PreparedData | SFTData, trained: bool) -> Qwen3Config:
    """The model config with the tokenizer's vocabulary and special-token ids. A tokenizer the
    project ``trained`` gets its vocabulary padded up to a multiple of 64 rows (matmul speed;
    no id ever maps to a padding row, and generation masks them); a given one is used as is."""
    tok = data.tokenizer
    vocab = padded_vocab_size(tok.vocab_size) if trained else tok.vocab_size
    return dataclasses.replace(
        cfg, vocab_size=vocab, bos_token_id=tok.eos_id, eos_token_id=tok.eos_id
    )


def prepare_run_data(cfg: RunConfig, dist: DistInfo) -> PreparedData:
    """Tokenizer and token cache. Under torchrun rank 0 builds (and alone repairs) them while
    the others poll for its completion marker: no collective waits on a build of hours."""
    vocab_size = cfg.data.vocab_size or cfg.model.vocab_size
    if not dist.is_distributed:
        return prepare_data(cfg.data, vocab_size)
    launch = from_main(uuid.uuid4().hex)  # the one collective: before any build starts
    marker = Path(cfg.data.cache_dir) / ".launches" / launch
    if not dist.is_main:
        load = functools.partial(
            prepare_data, cfg.data, vocab_size, progress=False, repair=False, build=False
        )
        return wait_for_data(load, marker)
    marker.parent.mkdir(parents=True, exist_ok=True)
    for old in marker.parent.iterdir():  # earlier launches' markers; theirs ranks are done
        if time.time() - old.stat().st_mtime > 86_400:
            old.unlink(missing_ok=True)
    try:
        data = prepare_data(cfg.data, vocab_size)
    except BaseException as err:
        marker.with_suffix(".failed").write_text(
            f"{err}" if isinstance(err, DataError) else repr(err)
        )
        raise
    marker.with_suffix(".done").write_text("")
    return data


def initial_model(
    cfg: RunConfig, model_cfg: Qwen3Config, device: torch.device, sharded: bool = False
) -> Qwen3:
    """A freshly initialised model, or with ``init_from`` the pretrained directory's weights in
    float32 (the optimizer still starts fresh: that is what sets it apart from ``resume``).
    ``sharded`` (FSDP across processes): a meta model, whose ``init_from`` weights each rank
    reads shard by shard after sharding (:func:`load_init_from`)."""
    if not cfg.init_from or sharded:  # weights come with materialize(), after FSDP sharding
        with torch.device("meta"):
            return Qwen3(model_cfg)
    try:
        return load_pretrained(cfg.init_from, device=device, dtype=torch.float32, config=model_cfg)
    except (OSError, ValueError) as e:
        raise ConfigError(f"init_from={cfg.init_from!r}: {e}") from None


def load_init_from(model: Qwen3, init_from: str) -> None:
    """Every rank: read the slices of ``init_from``'s weights that its shards hold (collective)."""
    try:
        load_sharded(model, init_from)
    except (OSError, ValueError) as e:
        raise ConfigError(f"init_from={init_from!r}: {e}") from None


def build_parts(
    cfg: RunConfig, dist: DistInfo, device: torch.device, precision: Precision
) -> RunParts:
    """Prepare data (tokenizer + token cache), then the model, optimizers and sampler."""
    tcfg = cfg.trainer
    data: PreparedData | SFTData
    if cfg.sft is not None and cfg.init_from:  # train.py sft: conversations, not a token cache
        from trainer.sft import prepare_sft_data  # it imports this module

        data = prepare_sft_data(cfg.init_from, cfg.sft, cfg.data.cache_dir, dist.is_main)
    else:
        data = prepare_run_data(cfg, dist)
        for source in data.sources:
            if len(source.val) < tcfg.seq_len + 1:
                of = f" of {source.label}" if data.is_mixture else ""
                raise ConfigError(
                    f"trainer.seq_len={tcfg.seq_len} is longer than the whole validation split"
                    f"{of} ({len(source.val)} tokens); lower trainer.seq_len or hold out more text"
                )
    # init_from: the pretrained directory's config (its vocabulary and special ids) as it is
    model_cfg = (
        cfg.model if cfg.init_from else model_config_for(cfg.model, data, not cfg.data.tokenizer)
    )
    if tcfg.seq_len > model_cfg.max_position_embeddings:
        raise ConfigError(
            f"trainer.seq_len={tcfg.seq_len} exceeds model.max_position_embeddings="
            f"{model_cfg.max_position_embeddings}; lower one or raise the other"
        )
    seed_everything(cfg.seed)
    # Under FSDP each rank allocates and initialises (or reads) only its shards, after sharding.
    shard_first = tcfg.fsdp and dist.is_distributed
    model = initial_model(cfg, model_cfg, device, shard_first)
    model.train()
    if model.device.type == "meta" and not shard_first:
        model.materialize(device)
    forward = wrap_model(
        model,
        dist,
        device,
        tcfg.fsdp,
        tcfg.compile,
        tcfg.activation_checkpointing,
        low_precision=precision.dtype if precision.name == "bf16" else None,
    )
    if model.device.type == "meta":
        model.materialize(device, init=not cfg.init_from)  # init_from's weights are read next
        if cfg.init_from:
            load_init_from(model, cfg.init_from)
    # The weights came from the run's seed, the same on every rank; from here on torch's RNG
    # draws what must differ across data-parallel ranks (attention dropout masks).
    torch.manual_seed(rank_seed(cfg.seed, dist))
    # DDP: the ranks split Muon's Newton-Schulz work (FSDP shards it by itself)
    replicas = torch.distributed.group.WORLD if dist.is_distributed and not tcfg.fsdp else None
    optimizers = build_optimizers(model, cfg.optim, tcfg.max_steps, data_parallel=replicas)
    rows = tcfg.batch_size * tcfg.grad_accum
    sampler: BatchSampler | SFTSampler
    if isinstance(data, SFTData):
        from trainer.sft import sft_sampler

        sampler = sft_sampler(
            data, rows, tcfg.seq_len, cfg.seed, dist.rank, dist.world_size, dist.is_main
        )
    else:
        sampler = BatchSampler(  # the one source's windows, or a mixture's by weight
            [s.train for s in data.sources] if data.is_mixture else data.train,
            rows,
            tcfg.seq_len,
            cfg.seed,
            rank=dist.rank,
            world_size=dist.world_size,
            weights=[s.weight for s in data.sources] if data.is_mixture else None,
            packing=cfg.data.rows(data.tokenizer.eos_id),  # the cache ends documents with it
        )
    try:
        lengths = data.tokenizer.token_byte_lengths()
    except ValueError as e:  # a given tokenizer that is not byte-level BPE
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer}: {e}") from None
    padding = [0] * (model_cfg.vocab_size - len(lengths))  # padding rows: no text, 0 bytes
    token_bytes = torch.tensor(lengths + padding, dtype=torch.int64, device=device)
    parts = RunParts(device, precision, data, model, forward, optimizers, sampler, token_bytes)
    if tcfg.eval_tasks:  # lm-eval is imported only here
        from trainer.downstream_loop import DownstreamScorer

        parts.downstream = DownstreamScorer(tcfg, parts, dist)
    return parts


_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    """The resolved ``trainer.precision``: ``name`` is fp32, bf16 or fp16."""

    name: str
    device_type: str
    dtype: torch.dtype | None  # autocast dtype; None = plain float32
    scaler: torch.amp.GradScaler | None = None

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        """The forward-pass context: autocast to ``dtype``, or nothing for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def resolve_precision(name: str, device: torch.device) -> Precision:
    """``auto``: bf16 where bf16 matmuls run in hardware (a CUDA GPU that supports it, a CPU with
    AMX or AVX-512 BF16: :func:`qwen3.device.cpu_has_native_bf16_matmul`), float32 elsewhere
    (other CPUs emulate bf16 matmuls far below float32's speed; MPS). ``fp16`` needs CUDA and
    uses a GradScaler."""
    if name == "auto":
        if device.type == "cuda":
            native = torch.cuda.is_bf16_supported()
        else:
            native = device.type == "cpu" and cpu_has_native_bf16_matmul()
        name = "bf16" if native else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"trainer.precision=fp16 needs a CUDA GPU (device is {device}); "
            "use trainer.precision=fp32 (or bf16)"
        )
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            "trainer.precision=bf16: this GPU has no bfloat16 support; use trainer.precision=fp16"
        )
    scaler = torch.amp.GradScaler("cuda") if name == "fp16" else None
    return Precision(name, device.type, _DTYPES[name], scaler)
