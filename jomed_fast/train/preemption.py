"""Stopping a run cleanly on SIGTERM (a cluster's pre-emption): finish the step, checkpoint, exit.

:class:`StopOnSignal` is a context manager that installs a SIGTERM handler for the duration of a
run and puts the previous one back afterwards. The handler only records the request; the loop
reads :attr:`StopOnSignal.requested` between steps, writes a checkpoint and raises
:class:`StoppedBySignal`, which the command line turns into one line on stderr and exit code
``128 + 15 = 143`` (what a shell reports for a process SIGTERM ended). A second SIGTERM while the
run is finishing gets the previous handler's behaviour (by default: the process ends at once,
which the atomic checkpoints survive).

The handler is installed only from the main thread (Python delivers signals there alone) and only
when the current one was set from Python (else it could not be put back).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = ["StopOnSignal", "StoppedBySignal"]


class StoppedBySignal(Exception):
    """A run stopped on a signal after ``step`` of ``total`` steps, its state in ``checkpoint``."""

    def __init__(self, signum: int, step: int, total: int, checkpoint: Path | None):
        self.signum, self.step, self.total, self.checkpoint = signum, step, total, checkpoint
        name = signal.Signals(signum).name
        where = f"checkpoint {checkpoint} written" if checkpoint is not None else "no checkpoint"
        super().__init__(f"stopped by {name} after step {step} of {total}; {where}; rerun the same command to resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopOnSignal:
    """``with StopOnSignal() as stop: ... stop.requested``: SIGTERM is recorded, not obeyed, inside."""

    def __init__(self, signum: int = signal.SIGTERM):
        self.signum = signum
        self.requested = False
        self._previous: Callable[[int, FrameType | None], Any] | int | None = None
        self._installed = False

    def _handle(self, signum, frame) -> None:
        if self.requested:  # asked twice: the previous behaviour, now
            self._restore()
            signal.raise_signal(signum)
            return
        self.requested = True

    def _restore(self) -> None:
        if self._installed:
            signal.signal(self.signum, self._previous)
            self._installed = False

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(self.signum)
            if previous is not None:
                self._previous = previous
                signal.signal(self.signum, self._handle)
                self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        self._restore()
