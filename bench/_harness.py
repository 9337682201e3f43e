"""What the benchmarks share: one timer, one peak-memory probe, the JSON / PNG writers, text and
Markdown tables, and the argparse options every bench takes.

* :func:`time_call` times one call (wall or process CPU time; CUDA synchronised on both sides;
  optionally inside a profiler / NVTX range and with the peak memory of the call);
  :func:`round_robin` runs several functions in rounds on top of it (warm-up rounds untimed), so
  that load from other processes on a shared machine falls on all of them alike; :func:`profile`
  runs each once under ``torch.profiler``.
* :class:`PeakMemory` (``jomed_fast.memory.peak``): the CUDA allocator's peak, or on CPU the
  process's peak resident set.
* :func:`write_json` (atomic; NaN / inf as null), :func:`save_png` (atomic).
* :class:`Column`, :func:`text_table` / :func:`text_row`, :func:`markdown_table`.
* :func:`arguments`, :func:`add_common`, :func:`require_at_least`.

The bench scripts import it as ``bench._harness`` (they put the repository root on ``sys.path``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from jomed_fast._files import atomic_write_via
from jomed_fast._profiling import stage
from jomed_fast.memory.peak import PeakMemory

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def log(msg: str) -> None:
    """Progress, on stderr (stdout holds the results)."""
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Timing:
    seconds: float
    peak_bytes: int | None = None  # None: no memory probe was given


def sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(
    fn: Callable[[], Any],
    *,
    device=None,
    clock: str = "wall",
    memory: PeakMemory | None = None,
    name: str | None = None,
) -> tuple[Any, Timing]:
    """``(fn's output, Timing)`` of one call of ``fn``.

    ``clock="wall"``: elapsed time; ``"cpu"``: the process's CPU time (``time.process_time``),
    which on a machine shared with other jobs leaves out the time the process waited for a core
    (with one torch thread it equals the wall time of an idle machine; CPU work only). ``device``
    CUDA: synchronised before and after. ``name``: the call sits in a profiler / NVTX range of that
    name. ``memory``: reset before the call, its peak read after."""
    if memory is not None:
        memory.reset()
    sync(device)
    timer = CLOCKS[clock]
    start = timer()
    with stage(name) if name else contextlib.nullcontext():
        out = fn()
    sync(device)
    seconds = timer() - start
    return out, Timing(seconds, memory.peak() if memory is not None else None)


def round_robin(
    fns: dict[str, Callable[[], Any]],
    repeats: int | dict[str, int],
    *,
    warmup: int = 1,
    device=None,
    clock: str = "wall",
    memory: PeakMemory | None = None,
    ranges: dict[str, str] | None = None,
    on_round: Callable[[int, int], None] | None = None,
) -> dict[str, list[Timing]]:
    """Per name, the :class:`Timing` of ``repeats`` (an int, or one per name) calls of its function.

    ``warmup`` untimed rounds first; then each round calls every function that still needs calls,
    in the order of ``fns``. ``ranges``: a profiler range name per function (default none).
    ``on_round(r, rounds)`` after each timed round ``r`` (0-based)."""
    counts = repeats if isinstance(repeats, dict) else {name: repeats for name in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
        sync(device)
    out: dict[str, list[Timing]] = {name: [] for name in fns}
    rounds = max((counts.get(name, 0) for name in fns), default=0)
    for r in range(rounds):
        for name, fn in fns.items():
            if len(out[name]) < counts.get(name, 0):
                out[name].append(
                    time_call(fn, device=device, clock=clock, memory=memory, name=(ranges or {}).get(name))[1]
                )
        if on_round is not None:
            on_round(r, rounds)
    return out


def median_seconds(timings: Sequence[Timing]) -> float:
    return statistics.median(t.seconds for t in timings)


def profile(calls: dict[str, Callable[[], Any]], path: str | os.PathLike, row_limit: int = 25) -> None:
    """One call of each function under ``torch.profiler`` (CPU, and CUDA where present), each in a
    range of its name; the Chrome trace goes to ``path``, the top ops by self CPU time to stderr."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=activities, record_shapes=False) as prof:
        for name, fn in calls.items():
            with stage(name):
                fn()
    prof.export_chrome_trace(str(path))
    log(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit))
    log(f"wrote {path}")


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------
def json_safe(obj):
    """NaN / inf (e.g. a ratio whose baseline did not run) as JSON null; tuples as lists."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj) -> None:
    """``obj`` as indented JSON at ``path`` (parent folders made), written atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    text = json.dumps(json_safe(obj), indent=1, allow_nan=False) + "\n"
    atomic_write_via(path, lambda tmp: Path(tmp).write_text(text))


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | os.PathLike, dpi: int = 120) -> None:
    """``fig`` as a PNG at ``path`` (written atomically), then closed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_via(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    pyplot().close(fig)


@dataclasses.dataclass(frozen=True)
class Column:
    """A table column: ``title``, ``width`` in characters, the row's value (a key of a dict row, an
    attribute of an object row, or a function of the row), its format spec, a suffix, alignment."""

    title: str
    width: int
    value: str | Callable[[Any], Any]
    fmt: str = ""
    suffix: str = ""
    align: str = ">"

    def cell(self, row) -> str:
        if callable(self.value):
            v = self.value(row)
        else:
            v = row[self.value] if isinstance(row, dict) else getattr(row, self.value)
        return format(format(v, self.fmt) + self.suffix, f"{self.align}{self.width}")

    def head(self) -> str:
        return format(self.title, f"{self.align}{self.width}")


def text_row(columns: Sequence[Column], row, sep: str = " ") -> str:
    """One row of a :func:`text_table` (for tables printed a row at a time)."""
    return sep.join(c.cell(row) for c in columns)


def text_table(columns: Sequence[Column], rows: Sequence = (), sep: str = " ") -> str:
    """A title line, a rule as long as it, then one line per row (``rows`` empty: the head only)."""
    head = sep.join(c.head() for c in columns)
    return "\n".join([head, "-" * len(head), *(text_row(columns, r, sep) for r in rows)])


def markdown_table(header: Sequence[str], align: str, rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table; ``align`` one letter per column: ``l`` left, ``r`` right."""
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return "\n".join(["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(r) + " |" for r in rows)])


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------
def arguments(doc: str) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of the bench's docstring."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0])


def add_common(
    p: argparse.ArgumentParser,
    json_name: str,
    *,
    repeats: int | None = None,
    repeats_help: str = "timed calls per measurement",
    seed: int | None = None,
) -> None:
    """``--repeats`` (where ``repeats`` is given: its default), ``--seed`` (likewise) and ``--json``
    (default ``bench/results/<json_name>``), in that order."""
    if repeats is not None:
        p.add_argument("--repeats", type=int, default=repeats, help=repeats_help)
    if seed is not None:
        p.add_argument("--seed", type=int, default=seed)
    p.add_argument("--json", default=os.path.join(RESULTS, json_name), help="where the results go")


def require_at_least(parser: argparse.ArgumentParser, args: argparse.Namespace, minimum: int, *names: str) -> None:
    """``parser.error`` (exit 2) naming the first option among ``names`` below ``minimum``."""
    for name in names:
        value = getattr(args, name)
        if value < minimum:
            parser.error(f"--{name.replace('_', '-')}: expected an int >= {minimum}, got {value}")
