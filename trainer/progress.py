"""What a training run shows while it trains: a tqdm bar on a terminal, and where stdout is a
file or a pipe (``nohup``, a Slurm job, ``| tee``), where a bar prints nothing useful, one line
per logged step with the same facts::

    step 120/400 | loss 5.01 | lr 6.5e-3 | grad 0.48 | 6,650 tok/s | MFU 41% | 2m10s left

(plus the peak device memory on CUDA). The loop hands each metrics row to :meth:`Progress.log`.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import torch
from tqdm import tqdm  # type: ignore[import-untyped]


def _short_float(value: float) -> str:
    """``6.5e-3`` rather than Python's ``6.5e-03``."""
    mantissa, _, exponent = f"{value:.1e}".partition("e")
    return f"{mantissa}e{int(exponent)}"


def duration(seconds: float) -> str:
    """``45s``, ``2m10s``, ``1h05m``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def facts(row: dict[str, Any], device: torch.device | None = None) -> list[str]:
    """The figures of a metrics row worth watching, each as ``name value``."""
    out = [f"loss {row['train_loss']:.2f}"]
    if row.get("lr") is not None:
        out.append(f"lr {_short_float(row['lr'])}")
    if row.get("grad_norm") is not None:
        out.append(f"grad {row['grad_norm']:.3g}")
    out.append(f"{row.get('tokens_per_s', 0.0):,.0f} tok/s")
    mfu = 100 * float(row.get("mfu") or 0.0)
    out.append(f"MFU {mfu:.0f}%" if mfu >= 10 else f"MFU {mfu:.1f}%")
    if row.get("skipped_steps"):
        out.append(f"{row['skipped_steps']} skipped")
    if device is not None and device.type == "cuda":  # allocator statistics: no device sync
        out.append(f"mem {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    return out


class Progress:
    """The progress of one run's training steps on rank 0 (``enabled``); nothing elsewhere.

    On a terminal (``stream`` is a TTY) a tqdm bar carries the facts as its postfix; otherwise
    :meth:`log` prints them as one line, with the time left estimated from this session's
    steps so far."""

    def __init__(
        self,
        total: int,
        initial: int,
        enabled: bool,
        device: torch.device | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.total, self.step, self.device = total, initial, device
        self.stream = stream or sys.stdout
        self.lines = enabled and not self.stream.isatty()
        self.started, self.first_step = time.perf_counter(), initial
        self.kept: dict[str, str] = {}  # figures shown until replaced (a downstream score)
        # disable=None: tqdm itself also stays off where its own stream (stderr) is no terminal.
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc="train",
            unit="step",
            disable=None if enabled and not self.lines else True,
            dynamic_ncols=True,
        )

    def update(self, steps: int = 1) -> None:
        """``steps`` more training steps are done."""
        self.step += steps
        self.bar.update(steps)

    def set_total(self, total: int) -> None:
        """The run's length changed (trainer.time_budget)."""
        self.total = total
        self.bar.total = total
        self.bar.refresh()

    def seconds_left(self) -> float:
        done = self.step - self.first_step
        elapsed = time.perf_counter() - self.started
        return elapsed / done * (self.total - self.step) if done else 0.0

    def keep(self, name: str, value: str) -> None:
        """Show ``name value`` on every line from now on (until kept again)."""
        self.kept[name] = value

    def _facts(self, row: dict[str, Any]) -> list[str]:
        return [*facts(row, self.device), *(f"{k} {v}" for k, v in self.kept.items())]

    def line(self, row: dict[str, Any]) -> str:
        """The log line of a metrics row."""
        parts = [f"step {self.step}/{self.total}", *self._facts(row)]
        return " | ".join([*parts, f"{duration(self.seconds_left())} left"])

    def log(self, row: dict[str, Any]) -> None:
        """Show a metrics row: the bar's postfix on a terminal, else a line of its own."""
        if self.lines:
            print(self.line(row), file=self.stream, flush=True)
        else:
            self.bar.set_postfix_str(" | ".join(self._facts(row)), refresh=False)

    def close(self) -> None:
        self.bar.close()
