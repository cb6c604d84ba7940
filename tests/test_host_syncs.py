"""The training loop reads the device on log steps only: every way a tensor's value reaches Python
(``.item()``, ``.tolist()``, ``float()``, ``bool()``, ...) is counted per step of a real run, zero
between log steps and one on each log step (so the count sees the reads that do happen). A
stop request (here: one process) is acted on after the step it came in."""

from __future__ import annotations

import itertools
import math
import os
import signal

import pytest
import torch
from test_trainer_support import make_trainer, read_metrics, small_run_overrides, write_corpus

# Each of these hands a tensor's value to the host: on an accelerator, a wait for the device.
READS = ("item", "tolist", "__float__", "__int__", "__index__", "__bool__", "cpu", "numpy")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, write_corpus(root / "play.txt")


def _trainer(corpus, run, *extra: str):
    root, path = corpus
    overrides = [
        *small_run_overrides(root, path, cache_dir=root / "cache"),
        "trainer.eval_every=0",
        "trainer.save_every=0",
        *extra,
    ]
    return make_trainer(overrides, run)


def _count_reads(monkeypatch) -> list[str]:
    reads: list[str] = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *a: object, _o=original, _n=name, **k: object) -> object:
            reads.append(_n)
            return _o(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


@pytest.mark.parametrize("optim", ["muon", "adamw"])
def test_steps_between_log_steps_read_nothing_from_the_device(corpus, tmp_path, monkeypatch, optim):
    t = _trainer(
        corpus, tmp_path / "run", f"optim={optim}", "trainer.max_steps=7", "trainer.log_every=3"
    )
    reads = _count_reads(monkeypatch)
    at_step_start: list[int] = []
    take_step = t._train_one_step

    def observed() -> (
        None
    ):  # the reads before each step: the previous iteration's are the difference
        at_step_start.append(len(reads))
        take_step()

    monkeypatch.setattr(t, "_train_one_step", observed)
    out = t.fit()
    monkeypatch.undo()
    # reads[i]: iteration i + 1 (its step, then its log/eval/save work); step 7 evaluates and saves
    per_step = [b - a for a, b in itertools.pairwise(at_step_start)]
    assert per_step == [0, 0, 1, 0, 0, 1], per_step
    assert out.step == 7 and out.tokens_per_s > 0
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [3, 6, 7]
    assert all(math.isfinite(r["train_loss"]) and r["grad_norm"] > 0 for r in rows)


def test_one_process_stops_after_the_step_the_signal_came_in(corpus, tmp_path, monkeypatch) -> None:
    """A SIGTERM between log steps: one process reads, logs and saves at once (no other rank to
    agree with), and the row holds the steps since the last log."""
    t = _trainer(corpus, tmp_path / "run", "trainer.max_steps=20", "trainer.log_every=10")
    take_step = t._train_one_step

    def step_then_signal() -> None:
        take_step()
        if t.step == 4:  # the loop's own handler (trainer/stop.py) records it
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(t, "_train_one_step", step_then_signal)
    out = t.fit()
    assert out.step == 4 and out.stopped_by == "SIGTERM"
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [4]
    assert (tmp_path / "run" / "latest").resolve().name == "step-000004"
