"""Loss spikes: a finite step loss far above the recent ones (a z-score against a moving window
of the last accepted steps), as OLMo-core's stability monitor flags them. Each spike is
reported; with ``trainer.spike_action=skip`` its update is dropped like a non-finite step's.

The window lives on the loss's device and every decision is a tensor op, so watching costs no
host sync: the training loop reads the flags it collected only on its log steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# Too few accepted steps say nothing about the spread: no verdict before this many.
MIN_HISTORY = 20
# The spread is floored at this fraction of the mean, so a flat stretch of loss (std near 0)
# does not turn ordinary noise into spikes.
MIN_RELATIVE_STD = 0.01


@dataclass(frozen=True)
class Spike:
    """One flagged step: its loss, and the mean and z-score it was judged against."""

    step: int
    loss: float
    mean: float
    zscore: float


class SpikeMonitor:
    """Moving window of the last ``window`` accepted step losses (spikes and non-finite steps
    never enter it), and the spikes flagged since :meth:`take`."""

    def __init__(self, window: int, zscore: float) -> None:
        self.window, self.threshold = window, zscore
        self.losses = torch.zeros(window, dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.int64)  # accepted steps so far (capped: window)
        self.next = torch.zeros((), dtype=torch.int64)  # the ring buffer's write position
        self._seen: list[tuple[int, torch.Tensor]] = []  # (step, [spike, loss, mean, z])

    def _to(self, device: torch.device) -> None:
        if self.losses.device != device:
            self.losses, self.count, self.next = (
                t.to(device) for t in (self.losses, self.count, self.next)
            )

    def observe(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """Judge ``step``'s loss (a 0-dim tensor: the mean over ranks, so that every rank
        agrees), add it to the window unless it is a spike or not finite, and return the
        verdict as a 0-dim bool tensor on the loss's device (no host sync)."""
        self._to(loss.device)
        value = loss.detach().to(torch.float64)
        slots = torch.arange(self.window, device=loss.device)
        filled = slots < self.count
        n = self.count.clamp(min=1).to(torch.float64)
        mean = (self.losses * filled).sum() / n
        var = (((self.losses - mean) * filled) ** 2).sum() / n
        std = torch.maximum(var.sqrt(), mean.abs() * MIN_RELATIVE_STD).clamp(min=1e-12)
        z = (value - mean) / std
        finite = value.isfinite()
        spike = finite & (self.count >= MIN_HISTORY) & (z > self.threshold)
        accept = finite & ~spike
        slot = (slots == self.next) & accept  # not one_hot: it checks its bounds on the host
        self.losses = torch.where(slot, value, self.losses)
        self.next = torch.where(accept, (self.next + 1) % self.window, self.next)
        self.count = torch.where(accept, (self.count + 1).clamp(max=self.window), self.count)
        self._seen.append((step, torch.stack([spike.to(torch.float64), value, mean, z])))
        return spike

    def drop(self) -> None:
        """Forget the steps observed since the last :meth:`take` (none was a spike)."""
        self._seen.clear()

    def take(self) -> list[Spike]:
        """The spikes among the steps observed since the last call (one host read)."""
        if not self._seen:
            return []
        steps = [s for s, _ in self._seen]
        rows = torch.stack([r for _, r in self._seen]).cpu().tolist()
        self._seen.clear()
        return [
            Spike(step, loss, mean, z)
            for step, (flag, loss, mean, z) in zip(steps, rows, strict=True)
            if flag
        ]

    def state_dict(self) -> dict[str, Any]:
        """The window, for an exact resume (CPU tensors: trainer_state.pt loads weights-only)."""
        return {"losses": self.losses.cpu(), "count": int(self.count), "next": int(self.next)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        losses, count, nxt = (
            state["losses"].to(torch.float64),
            int(state["count"]),
            int(state["next"]),
        )
        if losses.numel() != self.window:  # resumed with another trainer.spike_window
            oldest_first = torch.roll(losses, -nxt) if count == losses.numel() else losses[:count]
            kept = oldest_first[-self.window :]
            losses = torch.zeros(self.window, dtype=torch.float64)
            losses[: kept.numel()] = kept
            count, nxt = kept.numel(), kept.numel() % self.window
        self.losses = losses
        self.count = torch.tensor(count)
        self.next = torch.tensor(nxt)
