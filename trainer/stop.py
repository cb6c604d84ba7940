"""Stop on signal: the first SIGINT/SIGTERM/SIGUSR1 becomes a flag the training loop polls, so
the run finishes its step and saves before it ends (SIGUSR1 is what a cluster scheduler sends
ahead of a time limit or preemption: Slurm's ``--signal=USR1@120``). One process polls it after
every step (a host flag, no device read); under torchrun the ranks agree on it at the next log
step, in the collective that reads the steps' results anyway (trainer/step_stats.py), so at most
``trainer.log_every`` steps later."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType, TracebackType

# SIGUSR1 does not exist on Windows
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name)
)


class StopRequest:
    """Context manager that turns the first SIGINT/SIGTERM/SIGUSR1 into a flag the loop polls.

    A second SIGINT raises KeyboardInterrupt at once (for a step that never ends).
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        print(
            f"\n{self.signal_name} received: finishing this step and saving a checkpoint "
            "(press Ctrl-C again to abort without saving)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
