"""BatchSampler and val_batches: purity, rank disjointness, DDP equivalence, stability."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data import BatchSampler, DataError, val_batches

TOKENS = np.arange(5000, dtype=np.uint16)  # token value == its position: windows are readable


def _windows(x: torch.Tensor) -> set[int]:
    return {int(row[0]) for row in x}


def test_batch_shapes_and_shift() -> None:
    x, y = BatchSampler(TOKENS, 4, 16, seed=0).batch(0)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y - x, torch.ones_like(x))  # contiguous windows of the token stream


def test_batch_is_pure_function_of_seed_step_rank() -> None:
    a = BatchSampler(TOKENS, 4, 16, seed=7)
    b = BatchSampler(TOKENS, 4, 16, seed=7)
    # any order of calls, any instance: the same batch for the same step
    later = a.batch(5)
    a.batch(0)
    assert torch.equal(b.batch(5)[0], later[0])
    assert torch.equal(a.batch(5)[0], later[0])
    assert not torch.equal(a.batch(6)[0], later[0])
    assert not torch.equal(BatchSampler(TOKENS, 4, 16, seed=8).batch(5)[0], later[0])


def test_ranks_disjoint_and_ddp_equals_single_process() -> None:
    single = BatchSampler(TOKENS, 16, 32, seed=3)
    ranks = [BatchSampler(TOKENS, 8, 32, seed=3, rank=r, world_size=2) for r in range(2)]
    for step in range(20):
        parts = [s.batch(step)[0] for s in ranks]
        assert not _windows(parts[0]) & _windows(parts[1])
        assert torch.equal(torch.cat(parts), single.batch(step)[0])


def test_windows_of_a_step_do_not_overlap() -> None:
    sampler = BatchSampler(TOKENS, 16, 32, seed=1)
    for step in range(50):
        starts = np.sort(sampler.starts(step))
        assert (np.diff(starts) >= 33).all()
        assert starts[0] >= 0 and starts[-1] + 33 <= len(TOKENS)


def test_small_corpus_falls_back_to_free_positions() -> None:
    tokens = np.arange(40, dtype=np.uint16)  # 2 windows of 17, but 8 are wanted
    sampler = BatchSampler(tokens, 8, 16, seed=0)
    x, y = sampler.batch(3)
    assert x.shape == (8, 16) and int(y.max()) <= 39
    assert torch.equal(x, BatchSampler(tokens, 8, 16, seed=0).batch(3)[0])


def test_all_positions_are_reachable() -> None:
    tokens = np.arange(200, dtype=np.uint16)
    sampler = BatchSampler(tokens, 2, 9, seed=0)
    starts = {int(s) for step in range(3000) for s in sampler.starts(step)}
    assert starts == set(range(0, 200 - 10 + 1))


def test_state_dict_round_trip() -> None:
    a = BatchSampler(TOKENS, 4, 16, seed=11)
    state = a.state_dict()
    assert all(isinstance(v, int) for v in state.values())
    b = BatchSampler(TOKENS, 4, 16, seed=0)
    b.load_state_dict(state)
    assert torch.equal(a.batch(42)[0], b.batch(42)[0])
    c = BatchSampler(TOKENS[:-1], 4, 16, seed=0)
    with pytest.raises(DataError, match="same data settings"):
        c.load_state_dict(state)


def test_corpus_smaller_than_one_window() -> None:
    with pytest.raises(DataError, match="fewer than one window.*lower trainer.seq_len"):
        BatchSampler(np.arange(16, dtype=np.uint16), 2, 16, seed=0)
    with pytest.raises(DataError, match="validation split has 10 tokens"):
        list(val_batches(np.arange(10, dtype=np.uint16), 2, 16, 1))
    with pytest.raises(DataError, match="rank=2"):
        BatchSampler(TOKENS, 2, 16, seed=0, rank=2, world_size=2)


def test_val_batches_stable_and_spread() -> None:
    first = list(val_batches(TOKENS, 4, 32, 5))
    second = list(val_batches(TOKENS, 4, 32, 5))
    assert len(first) == 5
    for (x1, y1), (x2, y2) in zip(first, second, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert torch.equal(x1[:, 1:], y1[:, :-1])
    starts = sorted(int(x[i, 0]) for x, _ in first for i in range(4))
    assert starts[0] == 0 and starts[-1] == len(TOKENS) - 33  # covers the whole split
    assert (np.diff(starts) >= 33).all()  # no overlap when there is room
