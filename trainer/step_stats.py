"""The training steps' results between two log steps, summed on the device and read on log steps
only: one collective over the ranks (carrying the stop flag too) and one read of the device.

A step's results are 0-d device tensors (trainer.step.StepResult); reading one makes the host
wait for the step. Summing them on the device lets the host queue step after step; on a log
step the sums, this rank's stop request and its divergence flag travel in one ``all_reduce`` and
come back to the host in one ``tolist()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.distributed import all_reduce_sum_
from trainer.step import StepResult

# Slots of the sums vector, all summed over the ranks on a log step.
_FIELDS = (
    "loss_sum",  # losses of the steps taken whose loss is finite (a rank's own)
    "loss_count",  # how many of those
    "grad_norm_sum",  # global norms of the steps taken (the same on every rank)
    "steps",  # steps taken (not skipped)
    "skipped",  # steps skipped: non-finite gradient norm, or a loss spike skipped
    "bad",  # of those, non-finite ones that were not fp16 overflows
    "diverged",  # 1 where max_bad_steps bad steps in a row happened since the last read
    "spikes",  # loss spikes flagged (trainer/spikes.py; the same on every rank)
    "spike_skipped",  # of those, the ones whose update was dropped (trainer.spike_action=skip)
    "aux_loss_sum",  # MoE: router load-balancing loss of the steps taken
    "expert_load_sum",  # MoE: the largest expert's share
    "stop",  # 1 where this rank was asked to stop (SIGINT/SIGTERM)
)
_AT = {name: i for i, name in enumerate(_FIELDS)}


@dataclass
class WindowStats:
    """The steps since the last read, over all ranks (``world`` of them)."""

    loss_sum: float
    loss_count: float
    grad_norm_sum: float
    steps: float
    skipped: float
    bad: float
    diverged: bool  # some rank saw max_bad_steps bad steps (non-finite or skipped spikes) in a row
    aux_loss_sum: float
    expert_load_sum: float
    stop: bool  # some rank was asked to stop
    spikes: float
    spike_skipped: float
    bad_in_row: int  # non-finite steps in a row at the last step (every rank's the same)
    world: int
    moe: bool  # the steps carried router statistics

    @property
    def train_loss(self) -> float:
        return self.loss_sum / self.loss_count if self.loss_count else float("nan")

    @property
    def grad_norm(self) -> float:
        return self.grad_norm_sum / self.steps if self.steps else float("nan")


class StepStats:
    """Sums of :class:`StepResult` on ``device`` since the last :meth:`read`. ``max_bad_steps``
    bad steps in a row (non-finite, fp16 overflows not counted, or loss spikes skipped) set the
    divergence flag."""

    def __init__(self, device: torch.device, max_bad_steps: int, world: int = 1) -> None:
        self.device, self.max_bad_steps, self.world = device, max_bad_steps, world
        self.sums = torch.zeros(len(_FIELDS), device=device)
        self.run = torch.zeros((), device=device)  # bad steps in a row, carried across reads
        self.moe = False

    def resume(self, bad_in_row: int) -> None:
        """Continue a run that had ``bad_in_row`` bad steps in a row when it was saved."""
        self.run.fill_(bad_in_row)

    def add(self, res: StepResult) -> None:
        """Account for one step, on the device (no host wait)."""
        taken = (~res.skipped).float()
        finite_loss = taken * res.loss.isfinite().float()
        no = torch.zeros((), dtype=torch.bool, device=res.skipped.device)
        spike = res.spike if res.spike is not None else no
        spike_skipped = res.spike_skipped if res.spike_skipped is not None else no
        bad = (res.skipped & ~res.overflow & ~spike_skipped).float()
        # a step taken resets the run, a bad one extends it, an fp16 overflow leaves it
        self.run.add_(bad + spike_skipped.float()).mul_(1 - taken)
        row = [
            torch.where(finite_loss > 0, res.loss, 0.0),
            finite_loss,
            torch.where(taken > 0, res.grad_norm, 0.0),
            taken,
            res.skipped.float(),
            bad,
            (self.run >= self.max_bad_steps).float(),
            spike.float(),
            spike_skipped.float(),
        ]
        update = torch.stack(row)
        self.sums[: len(row)] += update
        if res.router is not None:
            self.moe = True
            at = _AT["aux_loss_sum"]
            self.sums[at : at + 2] += torch.where(taken > 0, res.router, 0.0)
        # a flag, not a count: any bad run that reached the limit
        self.sums[_AT["diverged"]].clamp_(max=1)

    def read(self, stop_requested: bool) -> WindowStats:
        """The sums since the last read over every rank, with any rank's stop request; resets
        them. Collective: every rank calls it on the same steps. One device read."""
        if stop_requested:
            self.sums[_AT["stop"]].fill_(1)  # a fill with a host number: no copy to wait on
        out = torch.cat([self.sums, self.run.reshape(1)])
        all_reduce_sum_(out)  # the run is the same on every rank: divided back below
        values = out.tolist()
        self.sums.zero_()
        got = dict(zip(_FIELDS, values[: len(_FIELDS)], strict=True))
        return WindowStats(
            loss_sum=got["loss_sum"],
            loss_count=got["loss_count"],
            grad_norm_sum=got["grad_norm_sum"],
            steps=got["steps"],
            skipped=got["skipped"],
            bad=got["bad"],
            diverged=got["diverged"] > 0,
            aux_loss_sum=got["aux_loss_sum"],
            expert_load_sum=got["expert_load_sum"],
            stop=got["stop"] > 0,
            spikes=got["spikes"],
            spike_skipped=got["spike_skipped"],
            bad_in_row=round(values[-1] / self.world),
            world=self.world,
            moe=self.moe,
        )
