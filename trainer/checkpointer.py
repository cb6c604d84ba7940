"""The checkpoint lifecycle of a run: when a save may go ahead, writing it (in the background
with ``trainer.async_save``), publishing it (rename into place, move ``latest``/``best``,
prune), and what a full disk does to it. The training loop calls :meth:`Checkpointer.save`
after a step that wants one and :meth:`Checkpointer.poll` after every step.

A save that runs out of space is removed whole and the run ends with
:class:`DiskFull` (one line: where, how much is needed and free, what to do); ``latest`` and
``best`` stay on intact checkpoints, so a relaunch with ``resume`` continues. A periodic save
that would not fit in the free space is skipped with one line, keeping the run going.
"""

from __future__ import annotations

import errno
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint.api import CheckpointException
from tqdm import tqdm  # type: ignore[import-untyped]

from trainer.build import RunParts
from trainer.checkpoint import commit_checkpoint, stage_checkpoint, write_checkpoint_files
from trainer.distributed import DistInfo, any_rank, background_group, barrier, from_main
from trainer.errors import CheckpointError
from trainer.run_layout import (
    BEST,
    LATEST,
    prune_checkpoints,
    read_pointer,
    set_pointer,
)
from trainer.train_state import PendingSave, finish_weights, save_train_state

MB = 1024 * 1024
# Below this much free space a failed write is taken for a full disk even when the error does
# not carry ENOSPC (torch.save's zip writer reports a short write as "unexpected pos").
FULL_SLACK_BYTES = 16 * MB
# Files a killed save or plot leaves behind (the plot's and the pointers' temporaries).
LEFTOVER_PATTERNS = (".tmp-step-*", ".old-step-*", ".*.tmp-*", "*.jsonl.tmp-*")


class DiskFull(CheckpointError):
    """A save ran out of disk space (its partial files were removed)."""


def _mb(n: int) -> str:
    return f"{n / MB:,.0f} MB"


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _no_space_errno(err: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere in ``err``'s chain (DCP wraps each rank's failure)."""
    todo: list[BaseException] = [err]
    seen: set[int] = set()
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(e, CheckpointException):  # each rank's failure: (exception, traceback)
            for failure in e.failures.values():
                first = failure[0] if isinstance(failure, tuple) else failure
                if isinstance(first, BaseException):
                    todo.append(first)
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    return False


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem of ``path`` (its nearest existing ancestor)."""
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def remove_leftovers(run_dir: Path) -> list[str]:
    """Rank 0, before a run starts in ``run_dir``: delete what a killed save (or plot, or pointer
    swap) left there; returns their names. Complete checkpoints are never touched."""
    removed: list[str] = []
    if not run_dir.is_dir():
        return removed
    for pattern in LEFTOVER_PATTERNS:
        for p in run_dir.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p.name)
    return sorted(removed)


class Checkpointer:
    """Saves of one run directory; every rank holds one and calls it at the same steps."""

    def __init__(
        self,
        run_dir: Path,
        parts: RunParts,
        dist: DistInfo,
        config_yaml: str,
        keep_last: int,
        asynchronous: bool,
    ) -> None:
        self.run_dir, self.parts, self.dist = run_dir, parts, dist
        self.config_yaml, self.keep_last, self.asynchronous = config_yaml, keep_last, asynchronous
        self.last_saved: int | None = None
        self.pending: PendingSave | None = None  # a checkpoint being written in the background
        # one group per background write (save_train_state)
        self.groups = (background_group(), background_group()) if asynchronous else (None, None)
        self.pending_needed = 0  # expected_bytes() of the save in flight

    # ---- disk space -------------------------------------------------------------------------
    def expected_bytes(self) -> int:
        """What the next checkpoint will take: the size of the last one, or before the first,
        the weights (stored once; while a save is written, rank-by-rank parts of them too) plus
        two fp32 optimizer moments per parameter (AdamW's; Muon keeps less)."""
        latest = read_pointer(self.run_dir, LATEST)
        if latest is not None:
            return _dir_bytes(latest)
        weights = sum(p.numel() * 4 for p in self.parts.model.parameters())
        return 4 * weights

    def _fits(self, step: int, final: bool, needed: int) -> bool:
        """Rank 0 decides whether this save (``needed`` bytes) goes ahead; every rank learns its
        answer. A save that will not fit is skipped, except the run's final save, which still
        tries."""
        verdict = True
        if self.dist.is_main:
            free = free_bytes(self.run_dir)
            if free < needed:
                what = "trying anyway (the run's last save)" if final else "skipping this save"
                tqdm.write(
                    f"step {step}: low disk space in {self.run_dir}: a checkpoint needs about "
                    f"{_mb(needed)}, {_mb(free)} free; {what}. Free space or lower "
                    "trainer.keep_last."
                )
                verdict = final
        return bool(from_main(verdict))

    def _disk_full_message(self, step: int, err: BaseException, needed: int) -> str | None:
        """Rank 0: the one line for a save that failed for lack of space, after removing its
        partial directory; None when ``err`` is something else (a bug keeps its traceback)."""
        tmp = stage_checkpoint(self.run_dir, step, create=False)
        full = _no_space_errno(err) or free_bytes(self.run_dir) < min(needed, FULL_SLACK_BYTES)
        shutil.rmtree(tmp, ignore_errors=True)
        if not full:
            return None
        latest = read_pointer(self.run_dir, LATEST)
        kept = f"{latest.name} (latest) is intact" if latest else "no earlier checkpoint exists"
        return (
            f"out of disk space saving step {step} in {self.run_dir}: a checkpoint needs about "
            f"{_mb(needed)}, {_mb(free_bytes(self.run_dir))} free after removing the partial "
            f"save; {kept}. Free space (old runs, trainer.keep_last) or set out_dir to a larger "
            "disk, then resume"
        )

    # ---- saving -----------------------------------------------------------------------------
    def save(
        self, step: int, state: Callable[[], dict[str, Any]], improved: bool, final: bool
    ) -> None:
        """Save ``step``; once it is whole, move ``latest`` (and ``best`` if ``improved``).
        Collective. Every rank writes its shards of the weights and optimizer state (rank 0
        joins the weights into whole ``model-*.safetensors``); rank 0 writes the rest. ``final``: the
        run's last save, which is tried even when the disk looks too full."""
        self.finish()  # one save in flight at a time
        p, main = self.parts, self.dist.is_main
        needed = self.expected_bytes() if main else 0  # walks the last checkpoint: once a save
        if not self._fits(step, final, needed):
            return
        start = time.perf_counter()
        tmp = stage_checkpoint(self.run_dir, step, create=main)
        barrier()  # the directory exists before any rank writes into it
        failure: BaseException | None = None
        try:
            trainer_state = state()  # collective (every rank's RNG states): every rank calls it
            if main:
                write_checkpoint_files(
                    tmp, p.model, p.data.tokenizer, trainer_state, self.config_yaml
                )
        except (OSError, RuntimeError) as err:  # rank 0's files: no rank may wait in DCP for it
            failure = err
        if any_rank(failure is not None):
            self._raise(step, failure or OSError("another rank failed to write"), needed)
        try:
            futures = save_train_state(p.model, p.optimizers, tmp, self.groups, self.asynchronous)
        except (OSError, RuntimeError, CheckpointException) as err:
            self._raise(step, err, needed)
        self.last_saved = step
        blocked = time.perf_counter() - start
        if futures:
            self.pending = PendingSave(futures, step, improved, start, blocked)
            self.pending_needed = needed
        elif main:  # dcp.save returned on rank 0 after every rank's shards were written
            self._publish(PendingSave([], step, improved, start, blocked))

    def _raise(self, step: int, err: BaseException, needed: int) -> None:
        """Every rank, after a failed save: end the run with :class:`DiskFull` when rank 0 finds
        the disk full (all ranks alike, so none waits on another), else re-raise ``err``."""
        message = self._disk_full_message(step, err, needed) if self.dist.is_main else None
        message = from_main(message)
        if message is not None:
            raise DiskFull(message) from err
        raise err

    def _publish(self, save: PendingSave) -> None:
        """Rank 0: rename the whole checkpoint into place, move the pointers, say so."""
        tmp = stage_checkpoint(self.run_dir, save.step, create=False)
        finish_weights(tmp)
        path = commit_checkpoint(self.run_dir, tmp, save.step)
        set_pointer(self.run_dir, LATEST, path)
        if save.improved:
            set_pointer(self.run_dir, BEST, path)
        prune_checkpoints(self.run_dir, self.keep_last)
        tqdm.write(
            f"step {save.step}: saved {path.name} in {time.perf_counter() - save.started:.1f} s "
            f"(training waited {save.blocked:.1f} s)"
        )

    def poll(self) -> None:
        """Publish a background save that has finished (no waiting, no collective: rank 0's
        write completes only after every rank's shards are written)."""
        if self.pending is not None and self.pending.done():
            self.finish()

    def finish(self) -> None:
        """Wait for a background save, then publish it (rank 0)."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        try:
            pending.wait()
        except (OSError, RuntimeError, CheckpointException) as err:
            self._raise(pending.step, err, self.pending_needed)
        if self.dist.is_main:
            self._publish(pending)


def clean_start(run_dir: Path, dist: DistInfo) -> None:
    """Rank 0, before a run (new or resumed) starts in ``run_dir``: remove a killed save's
    leftovers and say so in one line."""
    if not dist.is_main:
        return
    removed = remove_leftovers(run_dir)
    if removed:
        print(f"removed leftovers of an interrupted save in {run_dir}: {', '.join(removed)}")
