"""trainer.time_budget: a run times its first steps and, at the end of its warmup, cuts its
length to what fits; the cut run is the run of that length, and it resumes as one."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file
from test_trainer_support import (
    compose_run_config,
    make_trainer,
    read_metrics,
    small_run_overrides,
    write_corpus,
)

import trainer.budget as budget
from optim import build_optimizers
from optim.config import OptimConfig
from qwen3 import Qwen3, Qwen3Config
from trainer.checkpoint import load_trainer_state
from trainer.errors import ConfigError


def test_auto_fits_the_default_length_and_keeps_a_length_that_was_set() -> None:
    default = compose_run_config(["model=tiny"]).trainer
    assert (default.max_steps, default.time_budget) == (600, 250.0)
    for length in ("trainer.max_steps=7", "trainer.max_tokens=1e6", "trainer.tokens_per_param=2"):
        assert compose_run_config([length]).trainer.time_budget is None, length
    both = compose_run_config(["trainer.max_steps=900", "trainer.time_budget=30"]).trainer
    assert (both.max_steps, both.time_budget) == (900, 30.0)  # a cap on what was set
    assert compose_run_config(["trainer.time_budget=null"]).trainer.time_budget is None


@pytest.mark.parametrize("value", ["0", "-5", "soon"])
def test_a_bad_time_budget_is_one_config_error(value) -> None:
    with pytest.raises(ConfigError, match=f"trainer.time_budget='?{value}") as err:
        compose_run_config([f"trainer.time_budget={value}"])
    assert "\n" not in str(err.value)


def test_steps_that_fit() -> None:
    # 30 steps done in 9 s (compilation included), 0.25 s each from here: 964 more fit in 250 s.
    assert budget.steps_that_fit(250.0, 30, 9.0, 0.25, 2000) == 994
    assert budget.steps_that_fit(250.0, 30, 9.0, 0.25, 600) == 600  # never longer than set
    assert budget.steps_that_fit(5.0, 30, 9.0, 0.25, 600) == 31  # spent: one step past the cut
    assert budget.decision_step(30) == 30  # the end of the warmup ...
    assert budget.decision_step(2) == budget.MIN_DECISION_STEP  # ... timed over enough steps


def _lrs(opts, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(opts.lrs()["lr/muon"])
        opts.step()
    return out


def test_a_cut_schedule_equals_the_schedule_of_that_length() -> None:
    """Decided at the end of the warmup, the learning rates are those of a run built that long;
    decided later, they follow that run from the decision on."""
    cfg = OptimConfig(name="muon", warmup_steps=10, lr=0.01, adamw_lr=0.01)
    model = Qwen3(Qwen3Config.from_preset("tiny", num_hidden_layers=1, vocab_size=256))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    reference = _lrs(build_optimizers(model, cfg, 40), 40)
    for decide in (10, 17):
        cut = build_optimizers(model, cfg, 1000)
        lrs = _lrs(cut, decide)
        cut.set_max_steps(40)
        lrs += _lrs(cut, 40 - decide)
        assert lrs[decide:] == reference[decide:]
        if decide == 10:
            assert lrs == reference


class _StepClock:
    """A clock that advances half a second per training step: timing without wall-clock."""

    def __init__(self) -> None:
        self.trainer = None

    def __call__(self) -> float:
        return 0.5 * self.trainer.step if self.trainer is not None else 0.0


@pytest.fixture
def step_clock(monkeypatch):
    clock = _StepClock()
    monkeypatch.setattr(budget.time, "perf_counter", clock)
    return clock


def test_a_budgeted_run_ends_where_its_budget_does_and_resumes_as_that_run(
    tmp_path, step_clock
) -> None:
    root = tmp_path
    corpus = write_corpus(root / "play.txt")
    overrides = [
        *small_run_overrides(root, corpus, cache_dir=root / "cache"),
        "trainer.max_steps=1000",
        "trainer.time_budget=20",
        "optim.warmup_steps=10",
        "trainer.eval_every=0",
        "trainer.save_every=15",
        "trainer.keep_last=5",
        "sample.max_new_tokens=0",
    ]
    run = make_trainer(overrides, root / "budgeted")
    step_clock.trainer = run
    outcome = run.fit()
    # Decided after step 10, 5 s in at 0.5 s a step (steps 4-10 timed): 30 more fit in 20 s.
    assert outcome.step == run.cfg.trainer.max_steps == 40
    assert outcome.budget == (
        "time budget 20 s: 0.5 s per step (steps 4-10), trainer.max_steps 1,000 -> 40"
    )
    rows = [r for r in read_metrics(root / "budgeted") if "train_loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 41))
    state = load_trainer_state(root / "budgeted" / "step-000040")
    assert state["time_budget_steps"] == 40

    # The same length, set: the same run, step for step.
    fixed = make_trainer(
        [*overrides, "trainer.max_steps=40", "trainer.time_budget=null"], root / "fixed"
    )
    fixed.fit()
    assert [r["train_loss"] for r in read_metrics(root / "fixed") if "train_loss" in r] == [
        r["train_loss"] for r in rows
    ]

    # Resumed after the decision (on a machine of another speed), it keeps the length it chose.
    step_clock.trainer = None  # a clock that never moves would fit all 1000 steps
    resumed = make_trainer(overrides, root / "resumed")
    resumed.resume_from(root / "budgeted" / "step-000030")
    resumed_outcome = resumed.fit()
    assert resumed_outcome.step == 40 and "set it before the resume" in resumed_outcome.budget
    final = [
        load_file(root / r / "step-000040" / "model.safetensors") for r in ("budgeted", "resumed")
    ]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


@pytest.mark.slow
def test_the_processes_of_a_torchrun_job_stop_at_rank_0s_length(tmp_path) -> None:
    """Each rank times its own steps; all take rank 0's length (a rank that stopped early would
    leave the others waiting in a collective)."""
    from test_distributed_support import base_overrides, run_torchrun

    corpus = write_corpus(tmp_path / "play.txt")
    res = run_torchrun(
        tmp_path,
        2,
        *base_overrides(tmp_path, corpus, tmp_path / "cache"),
        "run_name=ddp",
        "trainer.max_steps=100000",
        "trainer.time_budget=3",
        "optim.warmup_steps=10",
        "trainer.save_every=0",
    )
    assert res.returncode == 0, res.stderr
    found = re.search(r"trainer\.max_steps 100,000 -> ([\d,]+)", res.stdout)
    # rank 0 alone says it, when it decides and in the summary
    assert found and res.stdout.count("time budget 3 s:") == 2, res.stdout
    assert "budget          time budget 3 s:" in res.stdout
    steps = int(found.group(1).replace(",", ""))
    run = tmp_path / "runs" / "ddp"
    assert [r["step"] for r in read_metrics(run) if "train_loss" in r][-1] == steps
    assert load_trainer_state(run / f"step-{steps:06d}")["time_budget_steps"] == steps
