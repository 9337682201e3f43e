"""Fault guards shared by the trainers: a non-finite loss stops the run before it is applied.

:class:`NonFiniteLossError` is one of the command line's user errors (``jomed_fast.cli.USER_ERRORS``):
``train-reader`` / ``train-retriever`` print its message as one line and exit 2.
"""

from __future__ import annotations

import math

import torch

__all__ = ["NonFiniteLossError", "check_finite"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept (nothing was applied)."""


def check_finite(loss: torch.Tensor | float, step: int, last_checkpoint: str | None = None) -> None:
    """Raise :class:`NonFiniteLossError` naming the step (and the checkpoint to resume from)."""
    value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
    if not math.isfinite(value):
        where = (
            f"; the last good checkpoint is {last_checkpoint}" if last_checkpoint else "; no checkpoint was written yet"
        )
        raise NonFiniteLossError(
            f"loss: expected a finite value, got {value} at step {step} "
            f"(lower the learning rate or check the data, in a new run directory){where}"
        )
