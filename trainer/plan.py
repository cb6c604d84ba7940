"""``train.py plan``: before any work, what the run a command line describes will need.

``python train.py plan [overrides] devices=N device_memory=80GB [gpu=NAME] [mfu=0.4]
[format=json]`` builds the run's config from the same overrides as training (no data is read,
no tensor allocated: the model is built on the ``meta`` device for its counts) and prints the
parameters (total, and active per token for a mixture of experts), tokens per step, FLOPs per
token, the memory of one device by part (trainer/plan_memory.py), whether it fits, the largest
micro-batch that fits, and the time per step and to the token budget at an assumed MFU.

A training run on CUDA asks the same question first (:func:`warn_if_unfit`) and prints the
plan's suggested change when the answer is no.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from qwen3 import Qwen3
from qwen3.moe import Experts
from trainer.budget import planned_vocab_size
from trainer.config import RunConfig
from trainer.metrics import GPU_BF16_PEAKS
from trainer.plan_memory import Memory, Setup, memory, model_counts

DEFAULT_GPU = "NVIDIA H100 80GB HBM3"
DEFAULT_MFU = 0.4  # an assumption the output states: well-tuned dense training reaches 0.35-0.5
# Of a device's memory, what tensors may use: the CUDA context, the caching allocator's
# fragmentation and NCCL's buffers take the rest (a few GB on an 80 GB GPU).
USABLE_FRACTION = 0.9
PLAN_KEYS = ("devices", "device_memory", "gpu", "mfu", "format")
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$", re.I)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """``80GB`` (10^9), ``141GiB`` (2^30) or a number of bytes, as bytes; ValueError otherwise."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(
            f"device_memory={text!r} is not a size; write e.g. device_memory=80GB or 141GiB"
        )
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


@dataclass(frozen=True)
class Target:
    """The machine a plan is for."""

    devices: int = 1
    device_memory: int = 80 * 10**9
    gpu: str = DEFAULT_GPU  # a name of trainer.metrics.GPU_BF16_PEAKS (its peak FLOP/s)
    mfu: float = DEFAULT_MFU
    on_gpu: bool = True  # False: plan for the CPU (trainer.device=cpu)


def split_plan_options(args: list[str]) -> tuple[list[str], Target, bool]:
    """``args`` of ``train.py plan`` as (Hydra overrides, the target, JSON output?). Raises
    ValueError naming a bad option."""
    overrides: list[str] = []
    values: dict[str, str] = {}
    for arg in args:
        key, eq, value = arg.partition("=")
        if eq and key in PLAN_KEYS:
            values[key] = value
        else:
            overrides.append(arg)
    fmt = values.get("format", "text")
    if fmt not in ("text", "json"):
        raise ValueError(f"format={fmt!r} is not an output format; choose format=text or json")
    try:
        devices = int(values.get("devices", "1"))
    except ValueError:
        devices = 0
    if devices < 1:
        raise ValueError(
            f"devices={values['devices']!r} must be a whole number >= 1, e.g. devices=8"
        )
    try:
        mfu = float(values.get("mfu", DEFAULT_MFU))
    except ValueError:
        mfu = -1.0
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu={values['mfu']!r} must be a fraction in (0, 1], e.g. mfu=0.4")
    gpu = values.get("gpu", DEFAULT_GPU)
    if gpu not in GPU_BF16_PEAKS:
        raise ValueError(
            f"gpu={gpu!r} is not in the peak table; choose one of: {', '.join(GPU_BF16_PEAKS)}"
        )
    size = parse_size(values.get("device_memory", "80GB"))
    return overrides, Target(devices, size, gpu, mfu), fmt == "json"


@dataclass
class Plan:
    """What a run will need; :meth:`text` and :meth:`as_json` print it."""

    target: Target
    params_total: int
    params_active: int
    tokens_per_step: int
    flops_per_token: float
    steps: int
    total_tokens: int
    memory: Memory
    usable_bytes: int
    max_micro_batch: int
    micro_batch: int
    checkpointing: str
    mode: str  # one process | DDP | FSDP
    peak_flops: float
    suggestion: str

    @property
    def fits(self) -> bool:
        return self.memory.peak <= self.usable_bytes

    @property
    def step_seconds(self) -> float:
        device_flops = self.peak_flops * self.target.mfu * self.target.devices
        return self.flops_per_token * self.tokens_per_step / device_flops

    def as_json(self) -> dict[str, Any]:
        mem = dataclasses.asdict(self.memory)
        return {
            "params_total": self.params_total,
            "params_active": self.params_active,
            "tokens_per_step": self.tokens_per_step,
            "flops_per_token": self.flops_per_token,
            "devices": self.target.devices,
            "device_memory": self.target.device_memory,
            "usable_bytes": self.usable_bytes,
            "mode": self.mode,
            "activation_checkpointing": self.checkpointing,
            "micro_batch": self.micro_batch,
            "memory_bytes_per_device": {k: v for k, v in mem.items() if not k.endswith("_peak")},
            "peak_bytes_per_device": self.memory.peak,
            "fits": self.fits,
            "max_micro_batch": self.max_micro_batch,
            "suggestion": self.suggestion,
            "assumed_mfu": self.target.mfu,
            "peak_flops_per_device": self.peak_flops,
            "step_seconds": self.step_seconds,
            "steps": self.steps,
            "total_tokens": self.total_tokens,
            "total_seconds": self.step_seconds * self.steps,
        }

    def text(self) -> str:
        m, gib = self.memory, 2**30
        t = self.target
        active = ""
        if self.params_active != self.params_total:
            active = f", {self.params_active / 1e9:.3f} B active per token"
        rows = [
            ("weights (fp32)", m.weights),
            ("gradients (fp32)", m.grads),
            ("optimizer state", m.optimizer),
            (f"activations ({self.checkpointing})", m.activations),
            ("loss chunk", m.loss_chunk),
            ("backward, one layer", m.backward_work),
            ("FSDP gathers / bf16 copies", m.gathered),
            ("DDP buckets", m.ddp_buckets),
            ("Muon temporaries", m.muon_work),
        ]
        lines = [
            f"plan: {self.mode} on {t.devices} x {t.device_memory / 1e9:.0f} GB ({t.gpu})"
            if t.on_gpu
            else f"plan: {self.mode} on {t.devices} CPU process(es)",
            f"parameters        {self.params_total / 1e9:.3f} B total{active}",
            f"tokens per step   {self.tokens_per_step:,} (micro-batch {self.micro_batch})",
            f"FLOPs per token   {self.flops_per_token:.3g} (training: forward + backward)",
            "memory per device:",
            *(f"  {name:<26}{v / gib:9.2f} GiB" for name, v in rows),
            f"  {'peak':<26}{m.peak / gib:9.2f} GiB  (usable {self.usable_bytes / gib:.1f} GiB; "
            f"end of forward {m.forward_peak / gib:.2f}, of backward {m.backward_peak / gib:.2f}, "
            f"optimizer step {m.step_peak / gib:.2f})",
            f"fits              {'yes' if self.fits else 'NO'}; largest micro-batch that "
            f"fits: {self.max_micro_batch}",
        ]
        if self.suggestion:
            lines.append(f"suggestion        {self.suggestion}")
        if t.on_gpu:
            lines += [
                f"time per step     {self.step_seconds:.3g} s at an assumed MFU of {t.mfu:.0%} of "
                f"{self.peak_flops / 1e12:.0f} TFLOP/s per device (assumption, not a measurement)",
                f"to the budget     {self.steps:,} steps, {self.total_tokens:,} tokens: "
                f"{self.step_seconds * self.steps / 3600:.3g} h",
            ]
        return "\n".join(lines)


def _setup(
    cfg: RunConfig, target: Target, micro_batch: int, checkpointing: str, fsdp: bool
) -> Setup:
    t = cfg.trainer
    low = t.precision in ("bf16", "fp16") or (t.precision == "auto" and target.on_gpu)
    return Setup(
        micro_batch=micro_batch,
        seq_len=t.seq_len,
        grad_accum=t.grad_accum,
        devices=target.devices,
        fsdp=fsdp and target.devices > 1,
        low_precision=low,
        on_gpu=target.on_gpu,
        checkpointing=checkpointing,
        device_memory=target.device_memory,
    )


def plan_run(cfg: RunConfig, target: Target) -> Plan:
    """The plan of ``cfg`` on ``target`` (nothing allocated: the model is built on ``meta``)."""
    vocab = planned_vocab_size(cfg.model, cfg.data, cfg.init_from)
    model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab)
    with torch.device("meta"):
        model = Qwen3(model_cfg)
    counts = model_counts(model, cfg.optim.name)
    experts = sum(
        m.gate_up_proj.numel() + m.down_proj.numel()
        for m in model.modules()
        if isinstance(m, Experts)
    )
    k, e = model_cfg.num_experts_per_tok, max(1, model_cfg.num_experts)
    active = counts.total - round(experts * (1 - k / e))
    t = cfg.trainer
    fsdp = t.fsdp and target.devices > 1

    def mem(batch: int, ckpt: str = t.activation_checkpointing, sharded: bool = fsdp) -> Memory:
        setup = _setup(cfg, target, batch, ckpt, sharded)
        return memory(model_cfg, counts, vocab, setup, cfg.optim.name, cfg.optim.nesterov)

    usable = int(target.device_memory * USABLE_FRACTION)

    def largest(ckpt: str = t.activation_checkpointing, sharded: bool = fsdp) -> int:
        if mem(1, ckpt, sharded).peak > usable:
            return 0
        low, high = 1, 2
        while mem(high, ckpt, sharded).peak <= usable and high < 2**20:
            low, high = high, high * 2
        while high - low > 1:  # the peak grows with the micro-batch: bisect
            mid = (low + high) // 2
            low, high = (mid, high) if mem(mid, ckpt, sharded).peak <= usable else (low, mid)
        return low

    per_step = t.batch_size * t.grad_accum * target.devices * t.seq_len
    if t.max_tokens is not None:
        budget = t.max_tokens
    elif t.tokens_per_param is not None:
        budget = math.ceil(t.tokens_per_param * counts.total)
    else:
        budget = t.max_steps * per_step
    steps = max(1, math.ceil(budget / per_step))
    best = largest()
    peak = cfg.trainer.peak_flops or GPU_BF16_PEAKS[target.gpu]
    plan = Plan(
        target=target,
        params_total=counts.total,
        params_active=active,
        tokens_per_step=per_step,
        flops_per_token=model.estimate_flops(t.seq_len),
        steps=steps,
        total_tokens=steps * per_step,
        memory=mem(t.batch_size),
        usable_bytes=usable,
        max_micro_batch=best,
        micro_batch=t.batch_size,
        checkpointing=t.activation_checkpointing,
        mode="FSDP" if fsdp else ("DDP" if target.devices > 1 else "one process"),
        peak_flops=peak,
        suggestion="",
    )
    if not plan.fits:
        plan.suggestion = _suggest(cfg, target, best, largest, fsdp)
    return plan


def _suggest(
    cfg: RunConfig, target: Target, best: int, largest: Callable[..., int], fsdp: bool
) -> str:
    """The smallest change that makes the run fit, keeping its global batch."""
    t = cfg.trainer
    sequences = t.batch_size * t.grad_accum

    def batch(m: int) -> str:
        return f"trainer.batch_size={m} trainer.grad_accum={math.ceil(sequences / m)}"

    if best >= 1:
        return batch(best)
    for mode in ("selective", "full"):
        if mode != t.activation_checkpointing and largest(mode) >= 1:
            m = min(t.batch_size, largest(mode))
            return f"trainer.activation_checkpointing={mode} {batch(m) if m < t.batch_size else ''}".strip()
    if not fsdp and target.devices > 1:
        for mode in ("none", "selective", "full"):
            m = largest(mode, True)
            if m >= 1:
                return f"trainer.fsdp=true trainer.activation_checkpointing={mode} {batch(min(m, t.batch_size))}"
    return "none fits: more devices (with trainer.fsdp=true), more memory per device, or a smaller model"


def warn_if_unfit(
    cfg: RunConfig, device: torch.device, world: int, memory_bytes: int | None = None
) -> str | None:
    """On CUDA, the warning (printed to stderr, and returned) when the plan says the run will
    not fit the device's memory, with the plan's suggested change; None when it fits or the
    device is not a GPU. ``memory_bytes``: the device's memory (default: what CUDA reports)."""
    if device.type != "cuda":
        return None
    if memory_bytes is None:
        memory_bytes = torch.cuda.get_device_properties(device).total_memory
    gpu = torch.cuda.get_device_name(device) if torch.cuda.is_available() else DEFAULT_GPU
    target = Target(world, memory_bytes, gpu if gpu in GPU_BF16_PEAKS else DEFAULT_GPU)
    plan = plan_run(cfg, target)
    if plan.fits:
        return None
    message = (
        f"warning: train.py plan estimates {plan.memory.peak / 2**30:.1f} GiB per device at its "
        f"peak, over the {plan.usable_bytes / 2**30:.1f} GiB usable of {memory_bytes / 2**30:.1f} "
        f"GiB: this run will likely run out of memory; try {plan.suggestion}"
    )
    print(message, file=sys.stderr, flush=True)
    return message


def print_plan(plan: Plan, as_json: bool) -> None:
    """The plan as text, or with ``as_json`` the text followed by one JSON line."""
    if as_json:
        print(json.dumps(plan.as_json()))
    else:
        print(plan.text())


def plan_command(args: list[str]) -> int:
    """``train.py plan [overrides] [devices=N] [device_memory=80GB] [gpu=NAME] [mfu=0.4]
    [format=json]``: the exit code (2 with one line for a mistake in the command line)."""
    from trainer.cli import compose_config  # the CLI imports this module lazily
    from trainer.config import build_run_config, to_container
    from trainer.errors import ConfigError

    try:
        overrides, target, as_json = split_plan_options(args)
        cfg = build_run_config(to_container(compose_config(overrides)))
    except (ValueError, ConfigError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if cfg.trainer.device == "cpu":
        target = dataclasses.replace(target, on_gpu=False)
    print_plan(plan_run(cfg, target), as_json)
    return 0
