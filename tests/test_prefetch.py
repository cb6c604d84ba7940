"""Input pipeline: batches read one step ahead keep exact batches; a step syncs with the host once."""

from __future__ import annotations

import numpy as np
import torch

from data import BatchSampler
from optim import OptimConfig, build_optimizers
from qwen3 import Qwen3, Qwen3Config
from trainer.build import Precision
from trainer.prefetch import BatchPrefetcher
from trainer.step import train_step


class _Recording(BatchSampler):
    """A real sampler that records which steps' batches were read, in order."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.reads: list[int] = []

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.reads.append(step)
        return super().batch(step)


def _sampler() -> _Recording:
    tokens = np.random.default_rng(0).integers(0, 100, 5000).astype(np.int32)
    return _Recording(tokens, 4, 16, seed=3)


def test_prefetched_batches_are_the_samplers_and_read_one_step_ahead() -> None:
    sampler, plain = _sampler(), _sampler()
    batches = BatchPrefetcher(sampler, torch.device("cpu"))
    for step in range(4):  # as the loop does: get this step's batch, prefetch the next
        batch = batches.get(step)
        x, y = batch.x, batch.y
        assert torch.equal(x, plain.batch(step)[0]) and torch.equal(y, plain.batch(step)[1])
        batches.prefetch(step + 1)
        assert sampler.reads[-1] == step + 1  # the next batch is read before its step runs
    assert sampler.reads == [0, 1, 2, 3, 4]  # each batch read once
    # A resume (or any jump) gets the batch of the step asked for, not the one prefetched.
    x = batches.get(9).x
    assert torch.equal(x, plain.batch(9)[0]) and sampler.reads == [0, 1, 2, 3, 4, 9]
    batches.prefetch(10)
    batches.prefetch(10)  # already ahead: not read again
    assert sampler.reads.count(10) == 1


def test_a_training_step_reads_nothing_from_the_device(monkeypatch) -> None:
    """Every way a tensor's value reaches Python is counted during one step with 2 micro-batches
    (clipping on, plus the prefetch hook): none (the loop reads results on log steps only,
    tests/test_host_syncs.py)."""
    torch.manual_seed(0)
    model = Qwen3(
        Qwen3Config(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
        )
    )
    opt = build_optimizers(model, OptimConfig(name="adamw", warmup_steps=1), max_steps=10)
    sampler = _sampler()
    batches = BatchPrefetcher(sampler, torch.device("cpu"))
    fp32 = Precision("fp32", "cpu", None)
    first = batches.get(0)
    train_step(model, opt, first.x, first.y, 2, fp32, 1.0)  # creates the optimizer state
    # AdamW reads its step counters, which torch keeps on the CPU (also when training on CUDA):
    # those reads wait for no device, so they are not counted.
    counters = {id(s["step"]) for o in opt.optimizers for s in o.state.values() if "step" in s}
    assert counters
    batch = batches.get(1)
    x, y = batch.x, batch.y
    reads: list[str] = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *a: object, _o=original, _n=name, **k: object) -> object:
            if id(self) not in counters:
                reads.append(_n)
            return _o(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    res = train_step(model, opt, x, y, 2, fp32, 1.0, lambda: batches.prefetch(2))
    monkeypatch.undo()
    assert reads == [], reads
    assert sampler.reads == [0, 1, 2] and not res.read()["skipped"]
