"""Typed configuration of a training run: the ``trainer``, ``sample`` and ``wandb`` sections."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from qwen3.generate import Sampling

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
WANDB_MODES = ("auto", "online", "offline", "disabled")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _fail(key: str, value: Any, problem: str, fix: str) -> None:
    raise ValueError(f"{key}={value!r} {problem}; {fix}")


def _check_int(key: str, value: Any, low: int, example: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(key, value, f"must be a whole number >= {low}", f"set e.g. {key}={example}")


@dataclass
class TrainConfig:
    """The training loop: budget, batch shape, precision, and the cadence of logs, evals and saves.

    The optimizer update uses ``batch_size * grad_accum`` sequences of ``seq_len`` tokens per
    process; ``batch_size`` is what one forward pass holds in memory.
    """

    max_steps: int = 560
    batch_size: int = 16
    grad_accum: int = 1
    seq_len: int = 256
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    clip: float = 1.0  # global gradient-norm clip; 0 turns clipping off
    eval_every: int = 140
    eval_batches: int = 16
    log_every: int = 10
    save_every: int = 280
    keep_last: int = 2
    compile: bool = False
    device: str = "auto"
    peak_flops: float | None = None  # FLOP/s of one device (MFU); None: measured with a matmul
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    num_threads: int | None = None  # CPU threads for torch; None: torch's default
    fsdp: bool = False  # under torchrun: shard parameters with FSDP2 instead of replicating (DDP)

    def __post_init__(self) -> None:
        _check_int("trainer.max_steps", self.max_steps, 1, "600")
        _check_int("trainer.batch_size", self.batch_size, 1, "16")
        _check_int("trainer.grad_accum", self.grad_accum, 1, "1")
        _check_int("trainer.seq_len", self.seq_len, 2, "256")
        _check_int("trainer.eval_every", self.eval_every, 0, "200 (0 = only at the end)")
        _check_int("trainer.eval_batches", self.eval_batches, 1, "16")
        _check_int("trainer.log_every", self.log_every, 1, "10")
        _check_int("trainer.save_every", self.save_every, 0, "200 (0 = only at the end)")
        _check_int("trainer.keep_last", self.keep_last, 1, "2")
        _check_int("trainer.max_bad_steps", self.max_bad_steps, 1, "5")
        if self.num_threads is not None:
            _check_int("trainer.num_threads", self.num_threads, 1, "2")
        if not isinstance(self.fsdp, bool):
            _fail("trainer.fsdp", self.fsdp, "must be true or false", "set trainer.fsdp=true")
        if self.fsdp and self.precision == "fp16":  # GradScaler would see only local shards
            _fail("trainer.precision", "fp16", "does not work with trainer.fsdp=true",
                  "use trainer.precision=bf16 (or fp32) for sharded training")  # fmt: skip
        if self.precision not in PRECISIONS:
            _fail("trainer.precision", self.precision, "is not a known precision",
                  f"choose one of: {', '.join(PRECISIONS)}")  # fmt: skip
        if not isinstance(self.clip, int | float) or not math.isfinite(self.clip) or self.clip < 0:
            _fail(
                "trainer.clip",
                self.clip,
                "must be a finite number >= 0",
                "set e.g. trainer.clip=1.0",
            )
        if not isinstance(self.device, str) or not _DEVICE_RE.match(self.device):
            _fail("trainer.device", self.device, "is not a device",
                  "choose one of: auto, cpu, cuda, cuda:N, mps")  # fmt: skip
        if self.peak_flops is not None and not (
            isinstance(self.peak_flops, int | float) and self.peak_flops > 0
        ):
            _fail("trainer.peak_flops", self.peak_flops, "must be a positive FLOP/s figure or null",
                  "set e.g. trainer.peak_flops=2.5e11, or null to measure it")  # fmt: skip


@dataclass(frozen=True)
class SampleConfig(Sampling):
    """Text generated at the end of training (and the defaults of ``train.py demo``): the
    prompts, and the sampling settings of :class:`qwen3.Sampling`, which checks them. Its stop
    ids and seed are not keys: generation stops at <|endoftext|> and uses the run's seed."""

    key_prefix: ClassVar[str] = "sample."
    not_keys: ClassVar[tuple[str, ...]] = ("stop_ids", "seed")

    max_new_tokens: int = 120
    temperature: float = 0.8
    top_k: int | None = 50
    prompts: list[str] = field(default_factory=lambda: ["ROMEO:", "JULIET:\n", "First Citizen:\n"])


@dataclass
class WandbConfig:
    """Weights & Biases logging. ``auto``: online when logged in, offline otherwise."""

    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "qwen3-pretrain"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in WANDB_MODES:
            _fail("wandb.mode", self.mode, "is not a wandb mode",
                  f"choose one of: {', '.join(WANDB_MODES)}")  # fmt: skip
        if not isinstance(self.project, str) or not self.project:
            _fail(
                "wandb.project", self.project, "must be a non-empty name", "set wandb.project=NAME"
            )
