"""Training batches copied to the device one step ahead, so a GPU step never waits on the memmap.

The batch of a step stays a pure function of (seed, step, rank, world): the prefetcher only
decides *when* ``sampler.sample(step)`` is read, never which batch a step gets, so resuming at
any step gives the same batches.
"""

from __future__ import annotations

import torch

from data import Batch, BatchSampler


class BatchPrefetcher:
    """``get(step)`` returns that step's batch on ``device``; ``prefetch(step)`` starts the copy
    of a later step's batch. On CUDA the host batch goes through pinned memory and the copy is
    ``non_blocking``: it queues behind the current step's kernels (same stream) while the host
    reads the next windows. Elsewhere the copy is a plain one (no pinning: no CUDA context)."""

    def __init__(self, sampler: BatchSampler, device: torch.device) -> None:
        self.sampler, self.device = sampler, device
        self._ahead: tuple[int, Batch] | None = None

    def _load(self, step: int) -> Batch:
        return self.sampler.sample(step).to(self.device, pin=self.device.type == "cuda")

    def prefetch(self, step: int) -> None:
        """Start loading ``step``'s batch (a no-op if it is already the one ahead)."""
        if self._ahead is None or self._ahead[0] != step:
            self._ahead = (step, self._load(step))

    def get(self, step: int) -> Batch:
        """``step``'s batch: the prefetched one if it is that step's, else loaded now (the first
        step, or after a resume moved the step)."""
        if self._ahead is not None and self._ahead[0] == step:
            batch = self._ahead[1]
        else:
            batch = self._load(step)
        self._ahead = None
        return batch
