"""Budgets in tokens: trainer.max_tokens and trainer.tokens_per_param set trainer.max_steps from
the global batch and the model's parameter count; conflicts are one line; the summary says it."""

from __future__ import annotations

import math

import pytest
import torch
from test_trainer_support import (
    compose_run_config,
    read_metrics,
    run_train,
    small_run_overrides,
    write_corpus,
)

from qwen3 import Qwen3, Qwen3Config
from trainer.errors import ConfigError


def test_without_a_budget_the_run_is_600_steps_or_what_max_steps_says() -> None:
    cfg = compose_run_config(["model=tiny"])
    assert cfg.trainer.max_steps == 600 and cfg.budget == (
        "trainer.max_steps=600, cut to fit trainer.time_budget=250 s of training"
    )
    assert compose_run_config(["trainer.max_steps=7"]).trainer.max_steps == 7


def test_max_tokens_sets_the_steps_from_the_global_batch() -> None:
    cfg = compose_run_config(
        ["trainer.max_tokens=1e6", "trainer.batch_size=8", "trainer.grad_accum=2"]
    )
    per_step = 8 * 2 * 1 * 256
    assert cfg.trainer.max_steps == math.ceil(1e6 / per_step) == 245  # rounded up: >= budget
    assert "trainer.max_tokens=1,000,000 tokens -> 245 steps of 4,096 tokens" in cfg.budget
    # The warmup is fitted to the resolved length, not to the default one.
    assert cfg.optim.warmup_steps < 245


def test_the_processes_of_a_torchrun_job_share_the_budget(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    cfg = compose_run_config(["trainer.max_tokens=1e6", "trainer.batch_size=8"])
    assert cfg.trainer.max_steps == math.ceil(1e6 / (8 * 2 * 256))
    assert "x 2 processes" in cfg.budget


def test_tokens_per_param_counts_every_parameter_of_the_run_s_model() -> None:
    cfg = compose_run_config(["model=tiny", "trainer.tokens_per_param=20"])
    # Total parameters, embedding included (tied head once), at the vocabulary the run trains:
    # tiny's 8192 (already a multiple of 64).
    with torch.device("meta"):
        params = Qwen3(Qwen3Config.from_preset("tiny")).num_params()
    assert params == 1_639_488
    assert cfg.trainer.max_steps == math.ceil(20 * params / (16 * 256)) == 8006
    assert f"x {params:,} parameters" in cfg.budget
    # A trained vocabulary is padded to 64 rows before counting: 8000 -> 8000 (125 x 64),
    # 8001 -> 8064.
    odd = compose_run_config(["trainer.tokens_per_param=20", "data.vocab_size=8001"])
    with torch.device("meta"):
        padded = Qwen3(Qwen3Config.from_preset("tiny", vocab_size=8064)).num_params()
    assert odd.trainer.max_steps == math.ceil(20 * padded / (16 * 256))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["trainer.max_steps=100", "trainer.max_tokens=1e6"],
            "trainer.max_steps=100 and trainer.max_tokens=1000000 both set the run's length",
        ),
        (
            ["trainer.max_steps=100", "trainer.tokens_per_param=20"],
            "trainer.max_steps=100 and trainer.tokens_per_param=20.0 both set",
        ),
        (
            ["trainer.max_tokens=1e6", "trainer.tokens_per_param=20"],
            "are both set; keep one of them",
        ),
        (["trainer.max_tokens=0"], "trainer.max_tokens=0 must be a whole number >= 1"),
        (["trainer.tokens_per_param=-1"], "trainer.tokens_per_param=-1.0 must be a positive"),
    ],
)
def test_conflicting_or_bad_budgets_are_one_config_error(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as err:
        compose_run_config(overrides)
    assert "\n" not in str(err.value)


def test_the_summary_states_the_budget_the_run_resolved_to(tmp_path) -> None:
    corpus = write_corpus(tmp_path / "play.txt")
    res = run_train(
        tmp_path,
        *small_run_overrides(tmp_path, corpus),
        "trainer.max_tokens=400",  # 4 x 32 tokens a step: 3.1 -> 4 steps
        "trainer.eval_every=0",
        "sample.max_new_tokens=0",
        "run_name=budget",
    )
    assert res.returncode == 0, res.stderr
    assert "budget          trainer.max_tokens=400 tokens -> 4 steps of 128 tokens" in res.stdout
    assert [r["step"] for r in read_metrics(tmp_path / "runs" / "budget") if "train_loss" in r] == [
        1,
        2,
        3,
        4,
    ]
