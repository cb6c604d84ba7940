"""Downstream tasks inside the training loop (``trainer.eval_tasks``): real lm-eval runs on the
live model, equal to ``train.py eval`` of the saved checkpoints, in one process and under
torchrun (DDP, FSDP); the core suites' CORE score; a hub task without network; ``best``
following a downstream score across a resume."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_distributed_support import base_overrides, run_torchrun
from test_trainer_support import (
    REPO,
    compose_run_config,
    make_trainer,
    read_metrics,
    run_train,
    small_run_overrides,
    write_corpus,
)

from trainer.checkpoint import load_trainer_state
from trainer.cli import run_subcommand
from trainer.errors import ConfigError
from trainer.lm_eval_tasks import CORE_TASKS, LOCAL_TASKS

LIMIT = 10
NEXT_LINE = str(REPO / "benchmarks" / "lm_eval_tasks" / "shakespeare_next_line.yaml")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("downstream") / "play.txt")


@pytest.fixture(autouse=True)
def _elsewhere(monkeypatch, tmp_path) -> None:
    """In-process runs start outside the repository (the shipped task YAMLs read their data
    from their own folder, not the working directory's); datasets caches the tasks' data in the
    test's own folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def _overrides(tmp: Path, corpus: Path, *extra: str) -> list[str]:
    return [
        *small_run_overrides(tmp, corpus),
        "trainer.device=cpu",
        "trainer.max_steps=4",
        "trainer.eval_every=2",
        "trainer.save_every=2",
        "trainer.keep_last=5",
        "sample.max_new_tokens=0",
        f"trainer.eval_tasks_limit={LIMIT}",
        *extra,
    ]


def _downstream_rows(run: Path) -> dict[int, dict[str, float]]:
    return {
        r["step"]: {k: v for k, v in r.items() if k.startswith("downstream/")}
        for r in read_metrics(run)
        if any(k.startswith("downstream/") for k in r)
    }


def _eval_checkpoint(ckpt: Path, tasks: str, limit: int, capsys) -> dict:
    """``train.py eval`` of ``ckpt`` (in process): the JSON record it wrote."""
    args = [f"ckpt={ckpt}", f"tasks=[{tasks}]", f"limit={limit}", "device=cpu", "wandb=false"]
    assert run_subcommand("eval", args) == 0
    out = capsys.readouterr().out
    written = Path(out.split("scores written to ")[1].split(" (")[0])
    return json.loads(written.read_text())


def _assert_equal_to_eval(run: Path, tasks: str, capsys, limit: int = LIMIT) -> None:
    """Each scored step's in-loop scores equal ``train.py eval`` of that step's checkpoint."""
    rows = _downstream_rows(run)
    assert sorted(rows) == [2, 4]
    for step, row in rows.items():
        record = _eval_checkpoint(run / f"step-{step:06d}", tasks, limit, capsys)
        for task, values in record["results"].items():
            for metric in ("acc", "acc_norm"):
                got = row[f"downstream/{task}/{metric}"]
                assert got == pytest.approx(values[f"{metric},none"], abs=1e-6)
        if "core" in record:
            assert row["downstream/core"] == pytest.approx(record["core"], abs=1e-6)


def test_in_loop_scores_equal_eval_of_the_checkpoint_and_core_is_centered(
    corpus, tmp_path, capsys
) -> None:
    run = tmp_path / "runs" / "r"
    trainer = make_trainer(_overrides(tmp_path, corpus, "trainer.eval_tasks=core_local"), run)
    outcome = trainer.fit()
    trainer.plots.wait()  # the plot with its downstream panel was drawn without an error
    assert (run / "metrics.png").stat().st_size > 1000
    rows = _downstream_rows(run)
    assert outcome.downstream_key == "downstream/core"
    assert outcome.downstream == [(s, rows[s]["downstream/core"]) for s in (2, 4)]
    for row in rows.values():
        assert {f"downstream/{t}/acc" for t in LOCAL_TASKS} <= set(row)
        centered = [(row[f"downstream/{t}/acc"] - 0.25) / 0.75 for t in LOCAL_TASKS]
        assert row["downstream/core"] == pytest.approx(sum(centered) / 3)
        assert all(CORE_TASKS[t] == ("acc", 0.25) for t in LOCAL_TASKS)
    _assert_equal_to_eval(run, "core_local", capsys)


def test_config_checks_of_the_downstream_keys(corpus, tmp_path) -> None:
    cfg = compose_run_config(_overrides(tmp_path, corpus, "trainer.eval_tasks=core"))
    assert cfg.trainer.eval_tasks == ["core"]
    cfg = compose_run_config(
        _overrides(tmp_path, corpus, "trainer.eval_tasks=[core]", "trainer.best_metric=val_acc")
    )
    assert cfg.trainer.best_higher
    assert not compose_run_config(_overrides(tmp_path, corpus)).trainer.best_higher
    mistakes = {
        "trainer.best_metric=downstream/core": "trainer.eval_tasks is empty",
        "trainer.best_metric=loss": "is not a key evaluations log",
        "trainer.eval_tasks_limit=0": "must be a count >= 1 or a fraction in (0, 1)",
        "trainer.eval_tasks_every=-1": "must be a whole number >= 0",
        "trainer.eval_tasks=[tasks/missing.yaml]": "'tasks/missing.yaml' names no existing task",
    }
    for override, message in mistakes.items():
        with pytest.raises(ConfigError, match=re.escape(message)) as err:
            compose_run_config(_overrides(tmp_path, corpus, override))
        assert "\n" not in str(err.value)


def test_best_follows_a_downstream_score_across_a_resume(corpus, tmp_path) -> None:
    key = "downstream/shakespeare_next_line/acc"
    extra = [f"trainer.eval_tasks=[{NEXT_LINE}]", f"trainer.best_metric={key}"]
    run = tmp_path / "runs" / "b"
    first = make_trainer(_overrides(tmp_path, corpus, *extra), run)
    first.fit()
    state = load_trainer_state(run / "latest")
    assert state["best_metric"] == key and state["best_step"] == first.best_step
    resumed = make_trainer(_overrides(tmp_path, corpus, *extra, "trainer.max_steps=8"), run)
    resumed.resume_from(run / "latest")
    assert (resumed.best_value, resumed.best_step) == (first.best_value, first.best_step)
    resumed.fit()
    scored = sorted((r["step"], r[key]) for r in read_metrics(run) if key in r)
    assert [s for s, _ in scored] == [2, 4, 6, 8]
    top = max(v for _, v in scored)
    best_step = next(s for s, v in scored if v == top)  # a tie keeps the earlier step
    assert (resumed.best_value, resumed.best_step) == (top, best_step)
    assert (run / "best").resolve().name == f"step-{best_step:06d}"


@pytest.mark.slow  # indexes lm-eval's thousands of task YAMLs (about 30 s)
def test_a_hub_task_without_network_is_named_once_and_the_run_goes_on(corpus, tmp_path) -> None:
    res = run_train(
        tmp_path,
        *_overrides(tmp_path, corpus, f"trainer.eval_tasks=[arc_easy,{NEXT_LINE}]"),
        "run_name=h",
    )
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if "arc_easy" in ln]
    assert len(lines) == 1 and lines[0].startswith("downstream: skipping arc_easy")
    assert "unset HF_DATASETS_OFFLINE" in lines[0]
    rows = _downstream_rows(tmp_path / "runs" / "h")
    assert sorted(rows) == [2, 4]
    assert all("shakespeare_next_line/" in k for r in rows.values() for k in r)


@pytest.mark.slow  # two 2-process runs (torchrun, gloo) and their checkpoints scored again
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_score_as_one_process_scores_their_checkpoints(
    corpus, tmp_path, capsys, mode
) -> None:
    base = base_overrides(tmp_path, corpus, tmp_path / "cache")
    res = run_torchrun(
        tmp_path,
        2,
        *base,
        "run_name=d",
        "trainer.eval_every=2",
        "trainer.batch_size=3",  # an odd number of scoring batches: one rank repeats one
        f"trainer.eval_tasks=[{NEXT_LINE}]",
        f"trainer.eval_tasks_limit={LIMIT + 1}",
        *(["trainer.fsdp=true"] if mode == "fsdp" else []),
    )
    assert res.returncode == 0, res.stderr
    assert "downstream/shakespeare_next_line/acc" in res.stdout
    _assert_equal_to_eval(tmp_path / "runs" / "d", NEXT_LINE, capsys, limit=LIMIT + 1)


def test_lm_eval_is_imported_only_when_tasks_are_set() -> None:
    """A run without trainer.eval_tasks never imports lm-eval (its import costs seconds)."""
    code = (
        "import sys, trainer.run, trainer.loop, trainer.build, trainer.config, trainer.cli\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lm_eval', 'datasets')))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert res.stdout.strip() == "[]"
