"""Batches of random training windows, a pure function of (seed, step, rank, world_size).

Each step draws world_size * batch_size windows of seq_len + 1 tokens from a generator seeded
by (seed, step) alone, and rank r takes the r-th slice. So resuming needs only the step, ranks
never share a window, and 2 ranks x 8 sequences see exactly the 16 windows 1 rank x 16 sees.
When the split holds enough windows, the windows of one step are disjoint spans of tokens: the
split is cut into whole windows from a random offset and distinct windows are chosen.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from data.errors import DataError
from data.token_cache import TokenArray

_STATE_VERSION = 1


def _check_size(tokens: TokenArray, seq_len: int, what: str) -> None:
    if seq_len < 1:
        raise DataError(f"seq_len={seq_len} must be at least 1")
    if len(tokens) < seq_len + 1:
        raise DataError(
            f"the {what} split has {len(tokens)} tokens, fewer than one window of "
            f"seq_len + 1 = {seq_len + 1}: lower trainer.seq_len or use a larger corpus"
        )


def _to_batch(
    tokens: TokenArray, starts: np.ndarray, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, (B, T) int64 each, for windows starting at `starts`."""
    index = starts[:, None] + np.arange(seq_len + 1)[None, :]  # (B, T+1)
    windows = torch.from_numpy(np.asarray(tokens[index], dtype=np.int64))
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


class BatchSampler:
    """Random training windows for one rank; `batch(step)` depends on nothing but its arguments."""

    def __init__(
        self,
        tokens: TokenArray,
        batch_size: int,
        seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} must be at least 1")
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must be in [0, world_size={world_size})")
        _check_size(tokens, seq_len, "train")
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.seed, self.rank, self.world_size = int(seed), rank, world_size

    def starts(self, step: int) -> np.ndarray:
        """Window start offsets of this rank at `step`, shape (batch_size,)."""
        window = self.seq_len + 1
        total = self.world_size * self.batch_size
        rng = np.random.Generator(np.random.PCG64([self.seed % (1 << 64), step]))
        offset = int(rng.integers(0, window))
        count = (len(self.tokens) - offset) // window
        if count < total:  # too few whole windows for disjoint draws: sample positions freely
            starts = rng.integers(0, len(self.tokens) - window + 1, size=total)
        else:
            starts = offset + window * rng.choice(count, size=total, replace=False)
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return mine.astype(np.int64)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 tensors of shape (batch_size, seq_len); y is x shifted by one token."""
        return _to_batch(self.tokens, self.starts(step), self.seq_len)

    def state_dict(self) -> dict[str, int]:
        """What decides the batches (plain ints, safe for `torch.load(weights_only=True)`)."""
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "world_size": self.world_size,
            "num_tokens": len(self.tokens),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the seed; refuse a state from a different corpus (the batches would differ)."""
        if state.get("num_tokens") != len(self.tokens):
            raise DataError(
                f"sampler state is for a train split of {state.get('num_tokens')} tokens, this "
                f"one has {len(self.tokens)}: resume with the same data settings or start a new run"
            )
        self.seed = int(state["seed"])


def val_batches(
    tokens: TokenArray, batch_size: int, seq_len: int, num_batches: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`num_batches` fixed validation batches, windows spread evenly over the whole split.

    The same every call. Windows do not overlap when the split has room for all of them.
    """
    _check_size(tokens, seq_len, "validation")
    if batch_size < 1 or num_batches < 1:
        raise DataError(f"batch_size={batch_size} and num_batches={num_batches} must be >= 1")
    total = batch_size * num_batches
    last = len(tokens) - (seq_len + 1)
    starts = np.linspace(0, last, num=total).round().astype(np.int64)
    for b in range(num_batches):
        yield _to_batch(tokens, starts[b * batch_size : (b + 1) * batch_size], seq_len)
