"""The GPU check's sizes (a GPU's, or toy ones for ``--dry-run``), the row every check returns,
and what the checks share: a device sync, a block's peak memory, a seeded model and batch, the
precision of a size. ``benchmarks/gpu_check.py`` runs the checks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import harness
import torch

from qwen3 import Qwen3, Qwen3Config
from trainer.build import Precision

# (benchmarks/gpu_check.py puts it on sys.path: a GPU node has no install of this project.)
REPO = Path(__file__).resolve().parents[1]

QWEN_VOCAB = 151_936
# GPT-2 small's width and depth (no preset has it): the benchmarks' ``100m`` shape, 100.7M
# parameters with its 32k vocabulary tied to the head.
SHAPE_100M = harness.config_for("100m")


@dataclass
class TrainShape:
    """One row's model and batch (and activation checkpointing, where the row sets it)."""

    name: str
    cfg: Qwen3Config
    batch: int
    seq: int
    checkpointing: str = "none"  # trainer.activation_checkpointing
    mfu_target: float | None = None  # issue 26's MFU target for the compiled step


@dataclass
class Sizes:
    """What each row runs at: the GPU sizes the issue names, or toy ones for --dry-run."""

    device: torch.device
    dtype: torch.dtype  # bf16 on the GPU; float32 on CPU, where bf16 matmuls can be 100x slower
    train: list[TrainShape]
    train_steps: int
    warmup_steps: int  # untimed steps first, per mode (the compiled rows compile in the first)
    fp16_steps: int
    optimizer: str  # muon on the GPU; adamw on CPU, where Muon's bf16 Newton-Schulz is slow
    compile_backend: str
    eval_batch: int
    eval_seq: int
    big_name: str
    big: Qwen3Config
    big_batch: int
    big_seq: int
    moe_name: str
    moe: Qwen3Config
    moe_tokens: int
    plans: list[TrainShape]  # train.py plan's peak against a measured step
    gen: Qwen3Config  # greedy device == CPU
    decode_name: str
    decode: Qwen3Config
    decode_tokens: int
    nproc: int


def gpu_sizes() -> Sizes:
    big = Qwen3Config.from_preset("qwen3-0.6b")
    moe = Qwen3Config.from_preset("qwen3-30b-a3b")
    return Sizes(
        device=torch.device("cuda"),
        dtype=torch.bfloat16,
        train=[
            TrainShape("small", Qwen3Config.from_preset("small"), 16, 1024),
            TrainShape("100M", SHAPE_100M, 16, 2048, mfu_target=0.30),
            TrainShape("qwen3-0.6b", big, 8, 2048, mfu_target=0.40),
        ],
        train_steps=10,
        warmup_steps=3,
        optimizer="muon",
        fp16_steps=30,
        compile_backend="inductor",
        eval_batch=8,
        eval_seq=4096,
        big_name="qwen3-0.6b",
        big=big,
        big_batch=4,
        big_seq=2048,
        moe_name="qwen3-30b-a3b's MoE layer",
        moe=moe,
        moe_tokens=8 * 2048,
        plans=[
            TrainShape("qwen3-0.6b", big, 4, 2048),
            # Issue 28's sizes: its layers whole (128 experts of 768, top 8) at seq 4096 with
            # selective checkpointing, two of them so that a 80 GB GPU holds the step unsharded.
            TrainShape(
                "qwen3-30b-a3b (2 of its 48 layers)",
                replace(moe, num_hidden_layers=2),
                1,
                4096,
                "selective",
            ),
        ],
        gen=Qwen3Config.from_preset("small"),
        decode_name="qwen3-0.6b",
        decode=big,
        decode_tokens=128,
        nproc=torch.cuda.device_count(),
    )


def dry_run_sizes() -> Sizes:
    toy = Qwen3Config.from_preset("tiny", vocab_size=512, max_position_embeddings=256)
    toy_moe = Qwen3Config.from_preset("tiny-moe", vocab_size=512, max_position_embeddings=256)
    return Sizes(
        device=torch.device("cpu"),
        dtype=torch.float32,
        train=[
            TrainShape("small (toy shape)", toy, 2, 64),
            TrainShape("100M (toy shape)", replace(toy, num_hidden_layers=2), 2, 64),
        ],
        train_steps=2,
        warmup_steps=1,
        optimizer="adamw",
        fp16_steps=6,
        compile_backend="aot_eager",  # traces the model like inductor, without a C++ build
        eval_batch=2,
        eval_seq=256,
        big_name="qwen3-0.6b (toy shape)",
        big=toy,
        big_batch=4,
        big_seq=256,
        moe_name="tiny-moe's MoE layer",
        moe=toy_moe,
        moe_tokens=256,
        plans=[
            TrainShape("qwen3-0.6b (toy shape)", toy, 4, 256),
            TrainShape("qwen3-30b-a3b (toy shape: tiny-moe)", toy_moe, 4, 256, "selective"),
        ],
        gen=toy,
        decode_name="tiny (toy shape)",
        decode=toy,
        decode_tokens=8,
        nproc=2,
    )


@dataclass
class Row:
    check: str
    figure: str
    ok: bool


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[list[float]]:
    """Yields a list that holds, after the block, the block's peak memory above its start in
    bytes: CUDA's allocator peak, or on CPU the process's peak RSS (VmHWM, reset first)."""
    out: list[float] = []
    sync_device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset VmHWM to the current RSS
        base = _proc_kib("VmRSS") * 1024
    yield out
    sync_device(device)
    if device.type == "cuda":
        out.append(torch.cuda.max_memory_allocated(device) - base)
    else:
        out.append(_proc_kib("VmHWM") * 1024 - base)


def flops_text(n: float) -> str:
    return f"{n / 1e12:,.0f} TFLOP/s" if n >= 1e12 else f"{n / 1e9:,.1f} GFLOP/s"


def gib_text(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def random_batch(cfg: Qwen3Config, b: int, t: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (b, t + 1), generator=g)
    return x[:, :-1].to(device), x[:, 1:].to(device)


def precision_of(s: Sizes) -> Precision:
    if s.dtype == torch.float32:
        return Precision("fp32", s.device.type, None)
    return Precision("bf16", s.device.type, torch.bfloat16)


def dtype_name(s: Sizes) -> str:
    return "bf16" if s.dtype == torch.bfloat16 else "fp32"


def seeded_model(cfg: Qwen3Config, device: torch.device, seed: int = 0) -> Qwen3:
    torch.manual_seed(seed)
    with torch.device(device):
        return Qwen3(cfg)


def close_to(got: list[float], want: list[float], rel: float) -> bool:
    return len(got) == len(want) and all(
        abs(g - w) <= rel * abs(w) for g, w in zip(got, want, strict=True)
    )


def error_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
