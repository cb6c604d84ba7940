"""Batches of random training windows, a pure function of (seed, step, rank, world_size).

Each step draws world_size * batch_size windows of seq_len + 1 tokens from a generator seeded
by (seed, step) alone, and rank r takes the r-th slice. So resuming needs only the step, ranks
never share a window, and 2 ranks x 8 sequences see exactly the 16 windows 1 rank x 16 sees.
When the split holds enough windows, the windows of one step are disjoint spans of tokens: the
split is cut into whole windows from a random offset and distinct windows are chosen.

That is ``data.packing=stream``. With ``bos`` the step's rows are whole documents packed
best-fit instead (data/packing.py), drawn from the same (seed, step) generator: the same purity,
so resume and process-count changes work alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from data.errors import DataError
from data.packing import Packing, document_bounds, draw_first_document, pack
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


def _draw_starts(rng: np.random.Generator, num_tokens: int, window: int, total: int) -> np.ndarray:
    """`total` window starts in a split of `num_tokens`: disjoint whole windows from a random
    offset when there are enough of them, else positions drawn freely."""
    offset = int(rng.integers(0, window))
    count = (num_tokens - offset) // window
    if count < total:
        return rng.integers(0, num_tokens - window + 1, size=total)
    return offset + window * rng.choice(count, size=total, replace=False)


@dataclass(frozen=True)
class Batch:
    """One rank's rows of a step: inputs ``x`` and their next-token targets ``y``, (B, T) int64.

    ``document_ids`` (B, T) int64 is set only with ``data.document_mask=true`` (whole-document
    rows): the index of each input token's document in its row (equal = same document, never
    decreasing along a row), for the model's document mask; None otherwise."""

    x: torch.Tensor
    y: torch.Tensor
    document_ids: torch.Tensor | None = None

    def to(self, device: torch.device, pin: bool = False) -> Batch:
        """The batch on ``device``; ``pin``: through pinned memory, copied without blocking."""
        moved = []
        for t in (self.x, self.y, self.document_ids):
            if t is not None and pin:
                t = t.pin_memory()
            moved.append(None if t is None else t.to(device, non_blocking=pin))
        x, y, docs = moved
        assert x is not None and y is not None
        return Batch(x, y, docs)


def _packed_batch(rows: np.ndarray, doc_ids: np.ndarray, document_mask: bool) -> Batch:
    """Inputs, targets and (with the mask) document ids of packed rows of seq_len + 1."""
    windows = torch.from_numpy(rows)
    docs = torch.from_numpy(doc_ids[:, :-1].copy()) if document_mask else None
    return Batch(windows[:, :-1].contiguous(), windows[:, 1:].contiguous(), docs)


def _to_batch(
    tokens: TokenArray, starts: np.ndarray, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, (B, T) int64 each, for windows starting at `starts`."""
    index = starts[:, None] + np.arange(seq_len + 1)[None, :]  # (B, T+1)
    windows = torch.from_numpy(np.asarray(tokens[index], dtype=np.int64))
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


class BatchSampler:
    """Random training windows for one rank; `batch(step)` depends on nothing but its arguments.

    `tokens` is one train split, or a mixture's splits (a list) with their `weights`: then each
    of a step's world_size * batch_size windows is first given a source by a generator seeded by
    (seed, step) (independently, with probability weight / sum of weights), and each source draws
    that many windows as one split does, from a generator seeded by (seed, step, source index).
    """

    def __init__(
        self,
        tokens: TokenArray | list[TokenArray],
        batch_size: int,
        seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        weights: list[float] | None = None,
        packing: Packing | None = None,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} must be at least 1")
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must be in [0, world_size={world_size})")
        self.sources = tokens if isinstance(tokens, list) else [tokens]
        self.weights = [float(w) for w in weights] if weights is not None else [1.0]
        w = np.asarray(self.weights, dtype=np.float64)
        if len(self.sources) != len(w):
            raise DataError(f"{len(self.sources)} train splits but {len(w)} weights")
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise DataError(f"mixture weights {self.weights} must be >= 0 with a positive sum")
        for i, split in enumerate(self.sources):
            if w[i] > 0:
                _check_size(split, seq_len, "train" if len(w) == 1 else f"train (source {i})")
        self.probs = w / w.sum()
        self.tokens = self.sources[0]
        self.batch_size, self.seq_len = batch_size, seq_len
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.packing = packing or Packing()
        self._bounds: dict[int, np.ndarray] = {}  # each source's documents, found on first use

    @property
    def is_mixture(self) -> bool:
        return len(self.sources) > 1

    def windows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(source index, start offset) of this rank's stream windows at `step`, each
        (batch_size,); `bos` packing draws its rows in :meth:`sample` instead."""
        total = self.world_size * self.batch_size
        seed = self.seed % (1 << 64)
        rng = np.random.Generator(np.random.PCG64([seed, step]))
        if not self.is_mixture:
            which = np.zeros(total, dtype=np.int64)
            starts = _draw_starts(rng, len(self.tokens), self.seq_len + 1, total)
        else:
            which = rng.choice(len(self.sources), size=total, p=self.probs)
            starts = np.zeros(total, dtype=np.int64)
            for i, split in enumerate(self.sources):
                picked = np.flatnonzero(which == i)
                if len(picked):
                    sub = np.random.Generator(np.random.PCG64([seed, step, i + 1]))
                    starts[picked] = _draw_starts(sub, len(split), self.seq_len + 1, len(picked))
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return which[mine], starts[mine].astype(np.int64)

    def starts(self, step: int) -> np.ndarray:
        """Window start offsets of this rank at `step` (in their sources), (batch_size,)."""
        return self.windows(step)[1]

    def bounds(self, source: int) -> np.ndarray:
        """The documents of a source's split (``data.packing.document_bounds``), found once."""
        if source not in self._bounds:
            split = self.sources[source]
            self._bounds[source] = document_bounds(split, self.packing.separator)
        return self._bounds[source]

    def sample(self, step: int) -> Batch:
        """This rank's :class:`Batch` at ``step`` (with document ids when the packing asks)."""
        if not self.packing.whole_documents:
            return Batch(*self.batch(step))
        total, row_len = self.world_size * self.batch_size, self.seq_len + 1
        seed = self.seed % (1 << 64)
        rng = np.random.Generator(np.random.PCG64([seed, step]))
        # Rows are filled for the whole global batch in order, then each rank takes its slice:
        # the rows depend on the global batch alone, not on how it is split between ranks.
        which = rng.choice(len(self.sources), size=total, p=self.probs) if self.is_mixture else None
        rows = np.empty((total, row_len), dtype=np.int64)
        docs = np.empty_like(rows)
        for i, split in enumerate(self.sources):
            picked = np.flatnonzero(which == i) if which is not None else np.arange(total)
            if len(picked):
                # one source draws from the step's generator, a mixture's from its own
                own = (
                    rng
                    if which is None
                    else np.random.Generator(np.random.PCG64([seed, step, i + 1]))
                )
                first = draw_first_document(own, self.bounds(i))
                rows[picked], docs[picked] = pack(
                    split,
                    self.bounds(i),
                    self.packing.separator,
                    first,
                    len(picked),
                    row_len,
                    self.packing.window,
                )
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return _packed_batch(rows[mine], docs[mine], self.packing.document_mask)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 tensors of shape (batch_size, seq_len); y is x shifted by one token
        (:meth:`sample` without the document ids)."""
        if self.packing.whole_documents:
            whole = self.sample(step)
            return whole.x, whole.y
        which, starts = self.windows(step)
        if not self.is_mixture:
            return _to_batch(self.tokens, starts, self.seq_len)
        x = torch.empty(self.batch_size, self.seq_len, dtype=torch.int64)
        y = torch.empty_like(x)
        for i in np.unique(which):
            rows = torch.from_numpy(np.flatnonzero(which == i))
            x[rows], y[rows] = _to_batch(self.sources[i], starts[rows.numpy()], self.seq_len)
        return x, y

    def state_dict(self) -> dict[str, Any]:
        """What decides the batches (plain numbers, safe for `torch.load(weights_only=True)`)."""
        state: dict[str, Any] = {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "world_size": self.world_size,
            "num_tokens": sum(len(s) for s in self.sources),
        }
        if self.is_mixture:
            state["source_tokens"] = [len(s) for s in self.sources]
            state["weights"] = self.weights
        if self.packing.whole_documents:  # stream states stay as they were
            state["packing"] = [self.packing.mode, self.packing.window]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the seed; refuse a state from a different corpus or mixture (the batches
        would differ)."""
        mine = self.state_dict()
        for key in ("num_tokens", "source_tokens", "weights", "packing"):
            if state.get(key) != mine.get(key):
                what = {"num_tokens": "a train split of", "packing": "packing [mode, window]"}.get(
                    key, f"a mixture with {key}"
                )
                raise DataError(
                    f"sampler state is for {what} {state.get(key)}, this one has "
                    f"{mine.get(key)}: resume with the same data settings or start a new run"
                )
        self.seed = int(state["seed"])


def val_batches(
    tokens: TokenArray, batch_size: int, seq_len: int, num_batches: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`num_batches` fixed validation batches, windows spread evenly over the whole split.

    The same every call. Windows do not overlap when the split has room for all of them.
    """
    for batch in val_samples(tokens, batch_size, seq_len, num_batches):
        yield batch.x, batch.y


def val_samples(
    tokens: TokenArray,
    batch_size: int,
    seq_len: int,
    num_batches: int,
    packing: Packing | None = None,
) -> Iterator[Batch]:
    """:func:`val_batches` as :class:`Batch` es; with ``bos`` packing, rows of whole documents
    packed from the split's first document on (the same every call), with document ids when
    the packing's document mask is on."""
    _check_size(tokens, seq_len, "validation")
    if batch_size < 1 or num_batches < 1:
        raise DataError(f"batch_size={batch_size} and num_batches={num_batches} must be >= 1")
    total = batch_size * num_batches
    if packing is not None and packing.whole_documents:
        bounds = document_bounds(tokens, packing.separator)
        rows, docs = pack(tokens, bounds, packing.separator, 0, total, seq_len + 1, packing.window)
        for b in range(num_batches):
            mine = slice(b * batch_size, (b + 1) * batch_size)
            yield _packed_batch(rows[mine], docs[mine], packing.document_mask)
        return
    last = len(tokens) - (seq_len + 1)
    starts = np.linspace(0, last, num=total).round().astype(np.int64)
    for b in range(num_batches):
        yield Batch(*_to_batch(tokens, starts[b * batch_size : (b + 1) * batch_size], seq_len))
