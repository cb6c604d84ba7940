"""The optimizer section of the run config: which optimizers, their hyperparameters, the schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

OPTIMIZER_NAMES = ("muon", "adamw")
SCHEDULES = ("cosine", "wsd", "constant")
ADJUST_LR_FNS = ("match_rms_adamw", "original")
ADAMW_IMPLS = ("auto", "fused", "foreach", "loop")
NS_DTYPES = ("auto", "float32", "bfloat16")


def _fail(field: str, value: Any, problem: str, fix: str) -> None:
    raise ValueError(f"optim.{field}={value!r} {problem}; {fix}")


def _check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(field, value, "is not a known choice", f"choose one of: {', '.join(choices)}")


def _check_positive(field: str, value: Any, example: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        _fail(field, value, "must be a finite number", f"set e.g. optim.{field}={example}")
    if value <= 0:
        _fail(field, value, "must be > 0", f"set a positive value, e.g. optim.{field}={example}")


def _check_range(field: str, value: Any, low: float, high: float, high_open: bool) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and low <= value and (value < high if high_open else value <= high)
    if not ok:
        bracket = ")" if high_open else "]"
        _fail(field, value, f"must lie in [{low}, {high}{bracket}", "pick a value in that range")


def _check_count(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        _fail(
            field, value, "must be a whole number >= 0", f"set e.g. optim.{field}=0 to turn it off"
        )


@dataclass
class OptimConfig:
    """Optimizers and learning-rate schedule for one run (mirrored one to one by conf/optim/*.yaml).

    name="muon" (default): torch.optim.Muon for every 2-D weight matrix inside the transformer
    blocks, AdamW for the embedding (and the lm_head tied to it), norms and 1-D parameters.
    name="adamw": AdamW for everything, the baseline.

    Muon learning-rate convention: ``adjust_lr_fn="match_rms_adamw"`` (Moonshot, "Muon is Scalable
    for LLM Training") scales each matrix's orthogonalised update by 0.2*sqrt(max(rows, cols)) so
    its RMS matches a typical AdamW update. ``lr`` and ``weight_decay`` then live on AdamW's scale
    (one lr for both optimizers is a sane start) and carry over across widths. torch's default,
    "original" (Keller Jordan's sqrt(max(1, rows/cols))), expects lr near 0.02, and its decoupled
    decay p *= 1 - lr*wd then means something else per unit of wd. On the tiny shape the two are
    close (DESIGN.md: match_rms_adamw ahead; a 300-step byte-level run here: original at 0.02
    1.208 vs 1.235 val loss) and both beat AdamW alone (1.449); we pick the convention whose
    numbers transfer. Muon's weight decay is decoupled and uses the unadjusted lr.

    torch 2.13 pitfall: with bf16 parameters and nesterov=False, Muon normalises its momentum
    buffer in place. Keep master parameters in float32 (use autocast for bf16 compute) or keep
    nesterov on; build_optimizers refuses the broken combination.
    """

    name: str = "muon"  # muon (Muon on block matrices, AdamW on the rest) | adamw (AdamW alone)
    # Muon (2-D matrices inside the transformer blocks)
    lr: float = 8e-3  # Muon's peak lr: best of the recipe search (benchmarks/results/recipe.md)
    weight_decay: float = 0.1  # Muon's decoupled weight decay
    momentum: float = 0.95  # Muon's momentum
    nesterov: bool = True  # Nesterov momentum for Muon
    adjust_lr_fn: str = "match_rms_adamw"  # Muon's per-matrix lr scale: match_rms_adamw | original
    ns_steps: int = 5  # Newton-Schulz iterations per Muon update
    # The Newton-Schulz iteration's dtype: auto (bf16, torch.optim.Muon's, except float32 on a CPU
    # without native bf16 matmuls: optim.muon_math.default_dtype) | float32 (slower where bf16 is
    # fast, and the same weights on any process count to float rounding) | bfloat16
    ns_dtype: str = "auto"
    # Muon momentum warmup: linear from momentum_warmup_start to momentum over these steps (0 = off)
    momentum_warmup_steps: int = 0
    momentum_warmup_start: float = 0.85  # Muon's momentum at the start of its warmup
    # AdamW (embeddings, lm_head, norms, 1-D params; everything when name="adamw")
    adamw_lr: float = 1.2e-2  # AdamW's peak learning rate
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW's betas
    eps: float = 1e-8  # AdamW's epsilon
    adamw_weight_decay: float = 0.1  # AdamW's weight decay (matrices outside the blocks)
    embed_weight_decay: bool = False  # decay the embedding too
    adamw_impl: str = "auto"  # auto (fused where it exists) | fused | foreach | loop
    # Schedule, shared by every optimizer, each from its own base lr
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    warmup_steps: int = 30  # linear warmup steps (30: ahead of 100 in the recipe search)
    min_lr_ratio: float = 0.1  # floor as a fraction of each optimizer's peak lr
    decay_fraction: float = 0.2  # wsd only: the final fraction of max_steps that decays linearly

    def __post_init__(self) -> None:
        _check_choice("name", self.name, OPTIMIZER_NAMES)
        _check_positive("lr", self.lr, "3e-3")
        _check_positive("adamw_lr", self.adamw_lr, "3e-3")
        _check_range("weight_decay", self.weight_decay, 0.0, math.inf, high_open=True)
        _check_range("adamw_weight_decay", self.adamw_weight_decay, 0.0, math.inf, high_open=True)
        _check_range("momentum", self.momentum, 0.0, 1.0, high_open=True)
        _check_range("momentum_warmup_start", self.momentum_warmup_start, 0.0, 1.0, high_open=True)
        _check_count("momentum_warmup_steps", self.momentum_warmup_steps)
        _check_choice("adjust_lr_fn", self.adjust_lr_fn, ADJUST_LR_FNS)
        _check_choice("ns_dtype", self.ns_dtype, NS_DTYPES)
        if isinstance(self.ns_steps, bool) or not isinstance(self.ns_steps, int):
            _fail("ns_steps", self.ns_steps, "must be a whole number", "set e.g. optim.ns_steps=5")
        if not 1 <= self.ns_steps < 100:
            _fail("ns_steps", self.ns_steps, "must lie in [1, 100)", "set e.g. optim.ns_steps=5")
        betas = tuple(self.betas)  # YAML gives a list
        if len(betas) != 2:
            _fail("betas", self.betas, "must hold two numbers", "set e.g. optim.betas=[0.9,0.95]")
        for i, beta in enumerate(betas):
            _check_range(f"betas[{i}]", beta, 0.0, 1.0, high_open=True)
        self.betas = (float(betas[0]), float(betas[1]))
        _check_positive("eps", self.eps, "1e-8")
        if not isinstance(self.nesterov, bool):
            _fail("nesterov", self.nesterov, "must be true or false", "set optim.nesterov=true")
        if not isinstance(self.embed_weight_decay, bool):
            _fail(
                "embed_weight_decay",
                self.embed_weight_decay,
                "must be true or false",
                "set optim.embed_weight_decay=false",
            )
        _check_choice("adamw_impl", self.adamw_impl, ADAMW_IMPLS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_count("warmup_steps", self.warmup_steps)
        _check_range("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0, high_open=False)
        _check_range("decay_fraction", self.decay_fraction, 0.0, 1.0, high_open=False)
        if self.decay_fraction == 0.0:
            _fail("decay_fraction", 0.0, "must be > 0", "set e.g. optim.decay_fraction=0.2")
