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


# ---- mixtures ---------------------------------------------------------------------------------
# Three sources whose token values say where they come from: source i holds i*10_000 + position.
MIX = [(np.arange(n) + 10_000 * i).astype(np.uint32) for i, n in enumerate((4000, 9000, 600))]


def _source_of(x: torch.Tensor) -> np.ndarray:
    return (x[:, 0] // 10_000).numpy()


def test_mixture_draws_sources_in_proportion_to_weights() -> None:
    weights = [0.6, 0.3, 0.1]
    sampler = BatchSampler(MIX, 16, 16, seed=3, weights=weights)
    counts = np.zeros(3)
    for step in range(400):
        x, y = sampler.batch(step)
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert ((y - x) == 1).all()  # every window lies within one source
        counts += np.bincount(_source_of(x), minlength=3)
    share = counts / counts.sum()  # 6400 windows: a standard error under 0.007
    assert np.allclose(share, weights, atol=0.03), share


def test_mixture_is_pure_and_splits_across_ranks_like_one_process() -> None:
    kw = {"seed": 9, "weights": [2.0, 1.0, 1.0]}
    a, b = BatchSampler(MIX, 8, 16, **kw), BatchSampler(MIX, 8, 16, **kw)
    later = a.batch(17)[0]
    a.batch(3)
    assert torch.equal(b.batch(17)[0], later) and torch.equal(a.batch(17)[0], later)
    assert not torch.equal(
        BatchSampler(MIX, 8, 16, seed=10, weights=kw["weights"]).batch(17)[0], later
    )
    ranks = [BatchSampler(MIX, 4, 16, rank=r, world_size=2, **kw) for r in range(2)]
    for step in range(20):
        assert torch.equal(torch.cat([r.batch(step)[0] for r in ranks]), a.batch(step)[0])


def test_mixture_zero_weight_source_is_never_drawn_and_state_round_trips() -> None:
    sampler = BatchSampler(MIX, 8, 16, seed=1, weights=[1.0, 0.0, 1.0])
    drawn = np.concatenate([_source_of(sampler.batch(s)[0]) for s in range(100)])
    assert set(drawn) == {0, 2}
    other = BatchSampler(MIX, 8, 16, seed=0, weights=[1.0, 0.0, 1.0])
    other.load_state_dict(sampler.state_dict())
    assert torch.equal(other.batch(5)[0], sampler.batch(5)[0])
    with pytest.raises(DataError, match="same data settings"):
        BatchSampler(MIX, 8, 16, seed=0, weights=[1.0, 1.0, 1.0]).load_state_dict(
            sampler.state_dict()
        )


def test_mixture_bad_weights_are_refused() -> None:
    with pytest.raises(DataError, match="positive sum"):
        BatchSampler(MIX, 8, 16, seed=0, weights=[0.0, 0.0, 0.0])
    with pytest.raises(DataError, match=">= 0"):
        BatchSampler(MIX, 8, 16, seed=0, weights=[1.0, -1.0, 1.0])
    with pytest.raises(DataError, match="3 train splits but 2 weights"):
        BatchSampler(MIX, 8, 16, seed=0, weights=[1.0, 1.0])
