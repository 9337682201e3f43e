"""The run's history as it goes: ``run_dir/log.jsonl``, one JSON object per line, and the same
scalars in TensorBoard (``run_dir/tensorboard/``) when asked for.

Every line has::

    kind        "train" (an optimizer step) or "eval" (an evaluation the stage made)
    step        optimizer steps done (0: before the first, where a fresh run evaluates)
    epoch       epochs done, fractional: e + p / n after the step (p examples of epoch e seen, n per epoch)
    elapsed_s   wall-clock seconds of the run so far, summed over its resumes (timing)

``train`` lines (every ``log_every`` steps and at the last step) add::

    loss            the step's loss (the stage's: stage 1 the answer-token mean NLL, stage 2 the KL)
    lr              the learning rate the step applied
    grad_norm       total L2 norm of the step's gradients, before clipping
    examples        examples the step trained on (stage 1: prompts, stage 2: queries)
    seconds         the step's wall time: forward, backward and optimizer (timing)
    examples_per_s  examples / seconds (timing)

``eval`` lines add the stage's validation metrics: stage 1 ``val_loss``; stage 2 ``kl``,
``agreement``, ``accuracy``, ``queries`` and, with a partner head, ``system_accuracy``
(:func:`jomed_fast.train.retriever_model.evaluate_retriever`). A float that is not finite is
written as ``null``.

Append-only and crash-safe: a line is one write, flushed at once, so a crash loses nothing written
before it, and SIGKILL can at most tear the last line, which :func:`read_log` skips. Consistent
with exact resume: a resumed run first drops every line past the checkpoint it resumes from (the
file is rewritten to the kept prefix atomically, :func:`jomed_fast._files.atomic_write_via`), and a
fresh run starts from an empty file, so the log of a resumed run equals an uninterrupted run's but
for :data:`TIMING_FIELDS`. TensorBoard gets the same purge (``SummaryWriter(purge_step=...)``).
The log is not part of the run's identity: the cadence and ``report_to`` may change on a resume.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from .._checks import check_int, is_number
from .._extras import require
from .._files import atomic_write_via

__all__ = ["LOG_FILE", "REPORT_TO", "TENSORBOARD_DIR", "TIMING_FIELDS", "RunLog", "check_report_to", "read_log"]

LOG_FILE = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"
REPORT_TO = ("none", "tensorboard")
# what differs between a resumed run's log and an uninterrupted run's
TIMING_FIELDS = ("elapsed_s", "seconds", "examples_per_s")


def _complete_lines(path: Path) -> tuple[list[dict], bytes]:
    """The parsed lines of ``path`` and their bytes, without a torn last line (no newline)."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # a tail after the last newline is a write SIGKILL cut short
    rows = []
    for number, line in enumerate(data[:end].splitlines(), start=1):
        try:
            row = json.loads(line)
        except ValueError:
            raise ValueError(f"{path}:{number}: expected a JSON object per line, got {line[:60]!r}") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ValueError(f"{path}:{number}: expected a JSON object with an int 'step', got {line[:60]!r}")
        rows.append(row)
    return rows, data[:end]


def read_log(run_dir) -> list[dict]:
    """Every line of ``run_dir/log.jsonl`` as a dict, in order (a torn last line is skipped; no file:
    ``[]``); a damaged line before it is a ``ValueError`` naming the file and line."""
    path = Path(run_dir) / LOG_FILE
    return _complete_lines(path)[0] if path.is_file() else []


def check_report_to(report_to: str) -> None:
    """``report_to`` is one of :data:`REPORT_TO` and what it needs is installed (``tensorboard``:
    the package, else :class:`~jomed_fast._extras.MissingDependency` naming it and the pip command)."""
    if report_to not in REPORT_TO:
        raise ValueError(f"report_to: expected one of {REPORT_TO}, got {report_to!r}")
    if report_to == "tensorboard":
        require("tensorboard", ("dev",), "report_to='tensorboard' (--report-to tensorboard)")


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLog:
    """The writer of one process's part of the log (see the module docstring); a context manager.

    ``resumed_step``: the step of the checkpoint the run resumes from (lines past it are dropped),
    ``None`` for a fresh run (every line is dropped)."""

    def __init__(self, run_dir, resumed_step: int | None, *, report_to: str = "none", log_every: int = 1):
        check_int("log_every", log_every, 1)
        check_report_to(report_to)
        run_dir = Path(run_dir)
        self.path = run_dir / LOG_FILE
        self.log_every = log_every
        kept = self._keep_prefix(resumed_step)
        self._elapsed_before = float(kept[-1].get("elapsed_s") or 0.0) if kept else 0.0
        self._started = time.perf_counter()
        self._file = open(self.path, "ab")
        self._tensorboard = None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard hides what an earlier process wrote at steps >= purge_step, as the log drops it
            purge = 0 if resumed_step is None else resumed_step + 1
            self._tensorboard = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=purge)

    def _keep_prefix(self, resumed_step: int | None) -> list[dict]:
        if not self.path.is_file():
            return []
        rows, data = _complete_lines(self.path)
        kept = [] if resumed_step is None else [r for r in rows if r["step"] <= resumed_step]
        if len(kept) == len(rows) and len(data) == self.path.stat().st_size:
            return kept
        text = b"".join(json.dumps(r).encode() + b"\n" for r in kept)
        atomic_write_via(self.path, lambda tmp: Path(tmp).write_bytes(text))
        return kept

    def elapsed(self) -> float:
        return self._elapsed_before + time.perf_counter() - self._started

    def due(self, step: int, last: bool) -> bool:
        """Whether step ``step`` gets a ``train`` line (every ``log_every`` steps and the last)."""
        return last or step % self.log_every == 0

    def write(self, kind: str, step: int, epoch: float, fields: dict) -> dict:
        """Append one line (flushed) and its scalars to TensorBoard; returns the line's dict."""
        row = {"kind": kind, "step": int(step), "epoch": float(epoch), **fields, "elapsed_s": self.elapsed()}
        row = {k: _json_value(v) for k, v in row.items()}
        self._file.write(json.dumps(row).encode() + b"\n")
        self._file.flush()
        if self._tensorboard is not None:
            for key, value in row.items():
                if key not in ("kind", "step") and is_number(value):
                    self._tensorboard.add_scalar(f"{kind}/{key}", value, step)
        return row

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
