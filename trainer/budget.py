"""How long a run trains: ``trainer.max_steps``, a budget in tokens that sets it, and a time
budget that can cut it to what this machine trains in so many seconds.

``trainer.max_tokens=N`` trains for N tokens; ``trainer.tokens_per_param=R`` for R tokens per
model parameter (20 is the compute-optimal ratio of Hoffmann et al. 2022, "Chinchilla"). Either
becomes a whole number of optimizer steps of the global batch, ``batch_size x grad_accum x
world_size x seq_len`` tokens, rounded up so the run sees at least the budget.

The parameter count is the model's total, embedding included and a tied LM head counted once
(Chinchilla counted the embedding too, unlike Kaplan et al. 2020). The vocabulary is the one the
run's model will have: ``init_from``'s, the given tokenizer's, or the tokenizer to be trained
padded up to a multiple of 64 (``qwen3.config.padded_vocab_size``).

``trainer.time_budget=S`` (:class:`TimeBudget`) times the run's first steps and, at the end of
the warmup, fixes ``max_steps`` to the steps that fit in S seconds (never more than it was). Until
then no learning rate has depended on the length, so the run is exactly the one a fixed
``max_steps`` of that value gives, and with it the length is saved for resume. By default
(``auto``) the main job's length is fitted this way and a length you set is kept as it is.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from data import DataConfig
from qwen3 import Qwen3, Qwen3Config, Qwen3Tokenizer
from qwen3.config import padded_vocab_size
from trainer.errors import ConfigError

if TYPE_CHECKING:
    from trainer.config import TrainConfig

# The main job (python train.py model=tiny): these steps, or as many as fit the time budget on a
# slower machine, so that it ends within 5 minutes all in (benchmarks/results/recipe.md).
DEFAULT_MAX_STEPS = 600
DEFAULT_TIME_BUDGET = 250.0  # seconds of training steps


def planned_vocab_size(model: Qwen3Config, data: DataConfig, init_from: str | None) -> int:
    """The embedding rows the run's model will have (``trainer.build.model_config_for``)."""
    if init_from:
        return model.vocab_size
    if data.tokenizer:
        try:
            return Qwen3Tokenizer.from_dir(Path(data.tokenizer).expanduser()).vocab_size
        except (OSError, ValueError):  # preparing the data reports it in one line
            return model.vocab_size
    return padded_vocab_size(data.vocab_size or model.vocab_size)


def parameter_count(model: Qwen3Config) -> int:
    """Total parameters of ``model`` (built on the meta device: no memory at any size)."""
    with torch.device("meta"):
        return Qwen3(model).num_params()


def resolve_max_steps(
    trainer: TrainConfig,
    steps_given: bool,
    model: Qwen3Config,
    data: DataConfig,
    init_from: str | None,
    world_size: int,
) -> tuple[TrainConfig, str]:
    """``trainer`` with ``max_steps`` set by its token budget when it has one, and one line
    saying how the run's length was resolved. ``steps_given``: ``trainer.max_steps`` was set
    (not null), which a budget conflicts with."""
    max_tokens, ratio = trainer.max_tokens, trainer.tokens_per_param
    if max_tokens is not None and ratio is not None:
        raise ConfigError(
            f"trainer.max_tokens={max_tokens} and trainer.tokens_per_param={ratio} are both set; "
            "keep one of them to say how long to train"
        )
    if max_tokens is None and ratio is None:
        return trainer, f"trainer.max_steps={trainer.max_steps}"
    budget = (
        f"trainer.max_tokens={max_tokens}" if ratio is None else f"trainer.tokens_per_param={ratio}"
    )
    if steps_given:
        raise ConfigError(
            f"trainer.max_steps={trainer.max_steps} and {budget} both set the run's length; "
            "drop one of them"
        )
    per_step = trainer.batch_size * trainer.grad_accum * world_size * trainer.seq_len
    if max_tokens is not None:
        tokens = float(max_tokens)
        how = f"trainer.max_tokens={max_tokens:,}"
    else:
        assert ratio is not None
        vocab = planned_vocab_size(model, data, init_from)
        params = parameter_count(dataclasses.replace(model, vocab_size=vocab))
        tokens = ratio * params
        how = (
            f"trainer.tokens_per_param={ratio:g} x {params:,} parameters (total, "
            f"vocabulary {vocab:,}) = {tokens:,.0f}"
        )
    steps = max(1, math.ceil(tokens / per_step))
    note = (
        f"{how} tokens -> {steps:,} steps of {per_step:,} tokens (batch_size "
        f"{trainer.batch_size} x grad_accum {trainer.grad_accum} x {world_size} processes x "
        f"seq_len {trainer.seq_len})"
    )
    return dataclasses.replace(trainer, max_steps=steps), note


# Steps the time budget times before it decides: after the first few (allocator, oneDNN and
# Inductor warm-up), at least this many, and never before the warmup has ended.
FIRST_TIMED_STEP = 3
MIN_DECISION_STEP = 10


def resolve_time_budget(value: float | str | None, length_given: bool) -> float | None:
    """``trainer.time_budget`` in seconds, or None: ``auto`` is :data:`DEFAULT_TIME_BUDGET` for a
    run left at the default length (the main job fits the machine) and none for a run whose
    length was set (``max_steps``, ``max_tokens`` or ``tokens_per_param``)."""
    if value == "auto":
        return None if length_given else DEFAULT_TIME_BUDGET
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(
            f"trainer.time_budget={value!r} must be auto, null or a number of seconds > 0; "
            "set e.g. trainer.time_budget=250"
        )
    return float(value)


def decision_step(warmup_steps: int) -> int:
    """The step after which a time-budgeted run fixes its length: the end of the warmup (no
    learning rate so far depended on the length, so the run is then exactly the one that
    ``trainer.max_steps`` would have given), and not before :data:`MIN_DECISION_STEP`."""
    return max(warmup_steps, MIN_DECISION_STEP)


def steps_that_fit(
    budget: float, decided_at: int, elapsed: float, step_seconds: float, max_steps: int
) -> int:
    """The run's length: the steps done (``decided_at``, taking ``elapsed`` seconds since the
    run started, compilation included) plus as many more of ``step_seconds`` each as the rest of
    ``budget`` holds; never more than ``max_steps``, and at least one step past the decision."""
    more = math.floor(max(0.0, budget - elapsed) / step_seconds) if step_seconds > 0 else max_steps
    return max(decided_at + 1, min(max_steps, decided_at + more))


class TimeBudget:
    """Fits a run's length to ``trainer.time_budget`` seconds of training on this machine.

    The run times its steps from :data:`FIRST_TIMED_STEP` to :func:`decision_step`, then sets
    ``max_steps`` to what fits (:func:`steps_that_fit`; every rank takes rank 0's figure). The
    length is saved with each checkpoint, so a resumed run continues the same schedule. Only the
    training steps count: evaluations, saves and samples come on top."""

    def __init__(self, budget: float, warmup_steps: int, max_steps: int, device: torch.device):
        self.budget, self.device, self.max_steps = budget, device, max_steps
        self.decide_at = decision_step(warmup_steps)
        self.decided: int | None = None
        self.per_step = 0.0
        self.start(0)

    def start(self, step: int) -> None:
        """Start the clock of a run that begins (or resumes) at ``step``. A run resumed before
        the decision times its own steps, and its budget counts from the resume."""
        self.started = self.timed_from = time.perf_counter()
        self.first_timed = max(step, min(step + FIRST_TIMED_STEP, self.decide_at - 1))

    def after_step(self, step: int) -> int | None:
        """Called after each step: the run's new length at the decision step, else None."""
        if self.decided is not None or step > self.decide_at or self.decide_at >= self.max_steps:
            return None
        if step == self.first_timed:
            _synchronize(self.device)
            self.timed_from = time.perf_counter()
        if step != self.decide_at:
            return None
        _synchronize(self.device)
        now = time.perf_counter()
        per_step = (now - self.timed_from) / max(1, step - self.first_timed)
        steps = steps_that_fit(self.budget, step, now - self.started, per_step, self.max_steps)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank must stop at the same step: rank 0's timing decides
            chosen = torch.tensor([steps], dtype=torch.int64, device=self.device)
            torch.distributed.broadcast(chosen, src=0)
            steps = int(chosen.item())
        self.decided = steps
        self.per_step = per_step
        return steps

    def note(self, before: int) -> str:
        """One line saying what the budget decided (after :meth:`after_step` returned)."""
        assert self.decided is not None
        fit = (
            f"all {before:,} steps fit"
            if self.decided == before
            else f"trainer.max_steps {before:,} -> {self.decided:,}"
        )
        return (
            f"time budget {self.budget:g} s: {self.per_step:.3g} s per step (steps "
            f"{self.first_timed + 1}-{self.decide_at}), {fit}"
        )


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued steps: the clock then measures them, not their launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
