"""How long a run trains: ``trainer.max_steps``, or a budget in tokens that sets it.

``trainer.max_tokens=N`` trains for N tokens; ``trainer.tokens_per_param=R`` for R tokens per
model parameter (20 is the compute-optimal ratio of Hoffmann et al. 2022, "Chinchilla"). Either
becomes a whole number of optimizer steps of the global batch, ``batch_size x grad_accum x
world_size x seq_len`` tokens, rounded up so the run sees at least the budget.

The parameter count is the model's total, embedding included and a tied LM head counted once
(Chinchilla counted the embedding too, unlike Kaplan et al. 2020). The vocabulary is the one the
run's model will have: ``init_from``'s, the given tokenizer's, or the tokenizer to be trained
padded up to a multiple of 64 (``qwen3.config.padded_vocab_size``).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from data import DataConfig
from qwen3 import Qwen3, Qwen3Config, Qwen3Tokenizer
from qwen3.config import padded_vocab_size
from trainer.errors import ConfigError

if TYPE_CHECKING:
    from trainer.config import TrainConfig

DEFAULT_MAX_STEPS = 400  # the main job (python train.py model=tiny): benchmarks/results/recipe.md


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
