"""Exact resume through the real CLI: a run killed (SIGKILL) or interrupted (SIGINT), then
resumed, logs the same train losses step for step as the same run uninterrupted (CPU, fp32);
a damaged checkpoint is skipped (resume=latest) or refused (resume=PATH) in one line."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from test_trainer_support import (
    REPO,
    compose_run_config,
    read_metrics,
    run_train,
    small_run_overrides,
    subprocess_env,
    train_cmd,
    write_corpus,
)

from trainer.checkpoint import load_trainer_state
from trainer.run import run_training

STEPS = 24


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The shared corpus and overrides, and the uninterrupted reference run."""
    tmp = tmp_path_factory.mktemp("resume")
    corpus = write_corpus(tmp / "play.txt")
    base = [
        *small_run_overrides(tmp, corpus),
        # A constant LR makes the losses independent of max_steps, so the interrupted runs can
        # be started "long" (and cut wherever the kill lands) and resumed with max_steps=STEPS.
        "optim.schedule=constant",
        "optim.warmup_steps=0",
        "trainer.eval_every=0",
        "trainer.save_every=4",
        "trainer.keep_last=2",
        "sample.max_new_tokens=0",
    ]
    ref = run_train(tmp, *base, f"trainer.max_steps={STEPS}", "run_name=reference")
    assert ref.returncode == 0, ref.stderr
    losses = [r["train_loss"] for r in read_metrics(tmp / "runs" / "reference")]
    assert len(losses) == STEPS
    return tmp, base, losses


def _start_long_run(tmp, base, name) -> subprocess.Popen:
    """Its output goes to files, not pipes: a pipe nobody reads while polling fills up and
    blocks the run before it is ready. ``_output`` reads them back."""
    with open(tmp / f"{name}.out", "w") as out, open(tmp / f"{name}.err", "w") as err:
        return subprocess.Popen(
            train_cmd(*base, "trainer.max_steps=100000", f"run_name={name}"),
            cwd=REPO,
            env=subprocess_env(tmp),
            stdout=out,
            stderr=err,
        )


def _output(tmp, name) -> tuple[str, str]:
    return (tmp / f"{name}.out").read_text(), (tmp / f"{name}.err").read_text()


def _wait_for(proc: subprocess.Popen, ready, tmp, name) -> None:
    """Poll until ``ready()``; fail if the process ends first."""
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"training ended early: {_output(tmp, name)}")
        time.sleep(0.01)


def test_resume_after_sigkill_matches_uninterrupted_run(setup) -> None:
    tmp, base, ref_losses = setup
    run = tmp / "runs" / "killed"
    proc = _start_long_run(tmp, base, "killed")
    _wait_for(proc, lambda: (run / "latest").exists(), tmp, "killed")
    proc.kill()
    proc.wait()
    saved = load_trainer_state(run / "latest")["step"]
    saved_dir = (run / "latest").resolve()
    assert 4 <= saved < STEPS
    res = run_train(tmp, *base, f"trainer.max_steps={STEPS}", "run_name=killed", "resume=latest")
    assert res.returncode == 0, res.stderr
    assert f"resumed from {saved_dir} at step {saved}" in res.stdout
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["train_loss"] for r in rows] == ref_losses


@pytest.mark.slow
def test_resume_after_sigint_matches_uninterrupted_run(setup) -> None:
    tmp, base, ref_losses = setup
    run = tmp / "runs" / "interrupted"
    proc = _start_long_run(tmp, base, "interrupted")
    _wait_for(
        proc,
        lambda: (run / "metrics.jsonl").exists() and len(read_metrics(run)) >= 6,
        tmp,
        "interrupted",
    )
    proc.send_signal(signal.SIGINT)
    proc.wait()
    out, err = _output(tmp, "interrupted")
    assert proc.returncode == 0, err
    stopped = load_trainer_state(run / "latest")["step"]
    assert read_metrics(run)[-1]["step"] == stopped < STEPS
    assert "SIGINT received" in err
    assert "resume=latest" in out and "run_name=interrupted" in out

    # A different model shape cannot resume it: the message names the mismatch.
    res = run_train(tmp, *base, "run_name=interrupted", "resume=latest", "model.hidden_size=32")
    assert res.returncode == 2
    assert "model.hidden_size is 64 in the checkpoint but 32" in res.stderr

    # resume=latest without a run name continues the most recent run (this one).
    res = run_train(tmp, *base, f"trainer.max_steps={STEPS}", "resume=latest")
    assert res.returncode == 0, res.stderr
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["train_loss"] for r in rows] == ref_losses


# ---- damaged checkpoints ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A run of two steps with a checkpoint at each (run_name=two), and its overrides."""
    tmp = tmp_path_factory.mktemp("damaged")
    base = [
        *small_run_overrides(tmp, write_corpus(tmp / "play.txt")),
        "optim.warmup_steps=0",
        "trainer.eval_every=0",
        "trainer.save_every=1",
        "trainer.max_steps=2",
        "sample.max_new_tokens=0",
    ]
    res = run_train(tmp, *base, "run_name=two")
    assert res.returncode == 0, res.stderr
    return tmp, base


def _damaged_copy(tmp: Path, kind: str, name: str) -> tuple[Path, str]:
    """A copy of the run ``two`` whose latest checkpoint (step 2) lost a file the way a full
    disk or a killed copy loses one; returns the run and what the message must say."""
    run = tmp / "runs" / name
    shutil.copytree(tmp / "runs" / "two", run, symlinks=True)
    ckpt = (run / "step-000002").resolve()
    if kind == "config":
        (ckpt / "config.json").unlink()
        return run, f"{ckpt / 'config.json'} is missing"
    # the weights: the one safetensors file a small model's checkpoint has (its index names it)
    file = next(ckpt.glob("model*.safetensors")) if kind == "weights" else ckpt / "trainer_state.pt"
    file.write_bytes(file.read_bytes()[:100])
    return run, f"{file} is damaged ("


@pytest.mark.parametrize(
    "kind",
    [
        "weights",
        pytest.param("state", marks=pytest.mark.slow),
        pytest.param("config", marks=pytest.mark.slow),
    ],
)
def test_resume_latest_skips_a_damaged_checkpoint(two_steps, kind) -> None:
    tmp, base = two_steps
    run, problem = _damaged_copy(tmp, kind, f"skip-{kind}")
    intact = (run / "step-000001").resolve()
    res = run_train(tmp, *base, f"run_name={run.name}", "resume=latest")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, res.stderr
    assert problem in warnings[0]
    assert f"resuming from {intact}, the newest intact checkpoint" in warnings[0]
    assert f"resumed from {intact} at step 1" in res.stdout
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    assert load_trainer_state(run / "latest")["step"] == 2  # step 2 trained and saved again


def test_an_explicit_damaged_checkpoint_is_refused(two_steps) -> None:
    tmp, base = two_steps
    run, problem = _damaged_copy(tmp, "state", "explicit")
    res = run_train(tmp, *base, f"run_name={run.name}", f"resume={run / 'step-000002'}")
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
    assert problem in errors[0]
    assert f"intact checkpoints of {run.resolve()}: step-000001" in errors[0]


def test_a_bug_during_resume_keeps_its_traceback(two_steps, monkeypatch) -> None:
    """Only the project's own errors become one line; a ValueError from anywhere else (here
    torch's, standing in for a bug) propagates with its traceback."""
    tmp, base = two_steps
    run = tmp / "runs" / "two"
    cfg = compose_run_config([*base, "run_name=two", "resume=latest"])

    def broken(state: torch.Tensor) -> None:
        raise ValueError("not the user's doing")

    monkeypatch.setattr(torch, "set_rng_state", broken)
    with pytest.raises(ValueError, match="not the user's doing"):
        run_training(cfg, run, "seed: 0\n", {}, [], time.perf_counter())
