"""The one place that knows which process this is (rank) and how many there are (world size)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DistInfo:
    """Rank of this process among ``world_size``; only rank 0 writes files and logs."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """Read RANK/WORLD_SIZE (as torchrun sets them). Multi-process training is not built yet,
    so a world size above 1 is refused with a clear message."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        raise RuntimeError(
            f"WORLD_SIZE={world_size}: multi-process (DDP) training is not supported yet; "
            "run train.py as a single process"
        )
    return DistInfo(rank, world_size)
