"""Loss spikes: the monitor's verdicts on a known series, its state across a resume, and a real
training run with a spike injected (a batch of random tokens), logged or skipped."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_trainer_support import make_trainer, read_metrics, small_run_overrides, write_corpus

from data import Batch
from trainer.spikes import MIN_HISTORY, SpikeMonitor


def _series(n: int, seed: int = 0) -> list[float]:
    """A falling, noisy loss curve like a training run's."""
    g = torch.Generator().manual_seed(seed)
    return [4.0 - 0.01 * i + 0.05 * float(torch.randn((), generator=g)) for i in range(n)]


def test_flags_only_the_spike_and_keeps_it_out_of_the_window() -> None:
    mon = SpikeMonitor(window=50, zscore=6.0)
    losses = _series(60)
    losses[40] += 2.0  # a spike: ~40 std of the noise
    verdicts = [bool(mon.observe(i, torch.tensor(v))) for i, v in enumerate(losses)]
    assert [i for i, v in enumerate(verdicts) if v] == [40]
    spikes = mon.take()
    assert [s.step for s in spikes] == [40]
    assert spikes[0].zscore > 6 and spikes[0].loss == pytest.approx(losses[40])
    assert mon.take() == []  # taken once
    assert int(mon.count) == 50  # 59 accepted steps, window full; the spike never entered
    assert float(mon.losses.max()) < 4.5


def test_no_verdict_before_enough_history_and_non_finite_is_not_a_spike() -> None:
    mon = SpikeMonitor(window=100, zscore=3.0)
    losses = [1.0] * (MIN_HISTORY - 1) + [100.0]
    assert not any(bool(mon.observe(i, torch.tensor(v))) for i, v in enumerate(losses))
    mon = SpikeMonitor(window=100, zscore=3.0)
    for i in range(MIN_HISTORY):
        mon.observe(i, torch.tensor(1.0 + 0.01 * (i % 3)))
    assert not bool(mon.observe(99, torch.tensor(float("nan"))))  # the non-finite check's job
    assert int(mon.count) == MIN_HISTORY
    # A flat stretch: ordinary noise (0.5% of the loss) is not a spike.
    assert not bool(mon.observe(100, torch.tensor(1.005)))


def test_state_round_trips_and_a_new_window_keeps_the_newest_losses() -> None:
    mon = SpikeMonitor(window=8, zscore=6.0)
    for i in range(11):
        mon.observe(i, torch.tensor(float(i)))
    again = SpikeMonitor(window=8, zscore=6.0)
    again.load_state_dict(mon.state_dict())
    assert torch.equal(again.losses, mon.losses) and int(again.next) == int(mon.next)
    smaller = SpikeMonitor(window=4, zscore=6.0)
    smaller.load_state_dict(mon.state_dict())
    assert smaller.losses.tolist() == [7.0, 8.0, 9.0, 10.0] and int(smaller.count) == 4
    larger = SpikeMonitor(window=16, zscore=6.0)
    larger.load_state_dict(mon.state_dict())
    assert larger.losses[:8].tolist() == [float(i) for i in range(3, 11)]
    assert int(larger.count) == 8 and int(larger.next) == 8


@pytest.mark.parametrize("action", ["log", "skip"])
def test_an_injected_spike_is_reported_and_skipped_on_request(tmp_path, capsys, action) -> None:
    corpus = write_corpus(tmp_path / "play.txt")
    spike_step = 30
    t = make_trainer(
        [
            *small_run_overrides(tmp_path, corpus),
            "optim=adamw",
            "trainer.max_steps=32",
            "trainer.eval_every=0",
            "trainer.log_every=4",
            "trainer.spike_zscore=4",
            f"trainer.spike_action={action}",
            "sample.max_new_tokens=0",
        ],
        tmp_path / "run",
    )
    get, weights = t.batches.get, {}

    def batch_with_spike(step: int) -> Batch:
        batch = get(step)
        if step + 1 == spike_step:  # step 30 must predict one token the corpus never has
            y = torch.full_like(batch.y, t.parts.model.config.vocab_size - 1)
            batch = dataclasses.replace(batch, y=y)
            weights["before"] = t.parts.model.lm_head.weight.detach().clone()
        if step + 1 == spike_step + 1:
            weights["after"] = t.parts.model.lm_head.weight.detach().clone()
        return batch

    t.batches.get = batch_with_spike
    t.fit()
    rows = {r["step"]: r for r in read_metrics(t.run_dir)}
    assert rows[32]["loss_spikes"] == 1 and rows[32]["loss_spike"] > 4
    assert not any("loss_spike" in r for s, r in rows.items() if s != 32)
    err = capsys.readouterr()
    lines = [ln for ln in (err.out + err.err).splitlines() if "loss spike" in ln]
    assert len(lines) == 1 and lines[0].startswith(f"step {spike_step}: loss spike")
    skipped = torch.equal(weights["before"], weights["after"])
    assert skipped == (action == "skip")
    assert rows[32].get("skipped_steps", 0) == (1 if action == "skip" else 0)
