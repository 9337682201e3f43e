"""Charts of the analysis tables: grouped bars of a ``{row: {column: value}}`` table and the
reliability diagram of fused probabilities, as PNGs beside the tables' JSON and markdown.

Every chart is drawn on its own :class:`matplotlib.figure.Figure` with the Agg canvas attached
(:class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`): no pyplot, no global figure state and
no ``matplotlib.use``, so plotting from a notebook leaves its backend and open figures alone.

What a reader of a chart is owed: a title; a y-axis that names the metric; every value written on
its bar as the tables write it (percent, one decimal: :func:`percent`); the number of queries
behind each group or series (``n=``); a missing value (``None``: a split with no query, a class
never seen) drawn as an ``n/a`` mark and no bar, so it never reads as zero; readable names
(:func:`display_name`: ``ft_rag`` -> "fine-tuned RAG").
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .._files import atomic_write_via

__all__ = [
    "MISSING",
    "ChartSpec",
    "bar_chart",
    "columns_label",
    "display_name",
    "percent",
    "reliability_chart",
    "save_png",
    "stage2_diagnostics_chart",
]

MISSING = "n/a"

_NAMES = {
    "reader_only": "reader only",
    "ft_rag": "fine-tuned RAG",
    "jomed": "JOMED",
    "macro_f1": "macro-F1",
    "subset_accuracy": "subset accuracy",
    "exact_match": "exact match",
    "top1_retrieval": "top-1 retrieval (own-head softmax)",
    "top1_retrieval_text": "top-1 retrieval, text head",
    "top1_retrieval_image": "top-1 retrieval, image head",
    "top1_confidence": "top-1 confidence",
}
_WORDS = {"jomed": "JOMED", "rag": "RAG", "ft": "fine-tuned", "f1": "F1", "top1": "top-1", "ece": "ECE"}


def display_name(key: str) -> str:
    """A table key as a chart shows it: ``ft_rag`` -> "fine-tuned RAG", ``jomed_no_retrieval`` ->
    "JOMED no retrieval", ``macro_f1`` -> "macro-F1"; other keys with spaces for underscores."""
    if key in _NAMES:
        return _NAMES[key]
    return " ".join(_WORDS.get(word.lower(), word) for word in str(key).split("_"))


def percent(value: float | None) -> str:
    """A fraction as the markdown tables write it: ``100 * value`` with one decimal, ``-`` for None."""
    return "-" if value is None else f"{100 * value:.1f}"


@dataclass(frozen=True)
class ChartSpec:
    """How a table is drawn: ``title``, ``ylabel`` (the metric, in percent), the number of queries
    per column (``column_n``: the x groups' tick labels) and per row (``row_n``: the legend)."""

    title: str
    ylabel: str
    column_n: Mapping[str, int] | None = None
    row_n: Mapping[str, int] | None = None


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _with_n(label: str, counts: Mapping[str, int] | None, key: str) -> str:
    return label if counts is None or key not in counts else f"{label} (n={counts[key]})"


def bar_chart(table: Mapping[str, Mapping[str, float | None]], spec: ChartSpec):
    """Grouped bars: one group per column, one bar per row (a series, in the legend), heights in
    percent (``100 * value``), each labelled with :func:`percent`; ``None`` is an ``n/a`` mark."""
    rows = list(table)
    cols = list(next(iter(table.values())).keys()) if table else []
    width = 0.8 / max(len(rows), 1)
    fig = _new_figure(max(5.0, 1.5 + len(cols) * (0.45 * len(rows) + 0.5)), 4.0)
    ax = fig.subplots()
    x = np.arange(len(cols), dtype=float)
    highest = 0.0
    for i, row in enumerate(rows):
        where = x - 0.4 + width * (i + 0.5)
        present = [j for j, c in enumerate(cols) if table[row][c] is not None]
        heights = [100 * float(table[row][cols[j]]) for j in present]  # type: ignore[arg-type]
        bars = ax.bar(where[present], heights, width, label=_with_n(display_name(row), spec.row_n, row))
        ax.bar_label(bars, labels=[percent(table[row][cols[j]]) for j in present], fontsize=7, padding=2)
        highest = max([highest, *heights])
        for j, c in enumerate(cols):
            if table[row][c] is None:
                ax.text(where[j], 1.0, MISSING, ha="center", va="bottom", rotation=90, fontsize=7, color="0.35")
    ticks = [display_name(c) if spec.column_n is None else f"{display_name(c)}\n(n={spec.column_n[c]})" for c in cols]
    ax.set_xticks(x, ticks)
    ax.set_ylim(0, max(100.0, highest) * 1.12)
    ax.set_ylabel(spec.ylabel)
    ax.set_title(spec.title, fontsize=10)
    if rows:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(len(rows), 3), frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return fig


def reliability_chart(calibration: Mapping[str, dict], title: str):
    """One panel per system: the accuracy of each confidence bin as a bar (percent; labelled with
    the value and the bin's n), the bin's mean confidence as a dot, and the diagonal a calibrated
    system follows. ``calibration``: ``{system: analysis.calibration.reliability(...)}``; an empty
    bin is an ``n/a`` mark."""
    systems = list(calibration)
    fig = _new_figure(max(4.5, 4.2 * len(systems)), 4.4)
    axes = np.atleast_1d(fig.subplots(1, max(len(systems), 1), squeeze=False)[0])
    for ax, name in zip(axes, systems):
        rel = calibration[name]
        bins = rel["bins"]
        width = 100 * (bins[0]["hi"] - bins[0]["lo"]) if bins else 10.0
        full = [b for b in bins if b["n"] > 0]
        centres = [50 * (b["lo"] + b["hi"]) for b in full]
        bars = ax.bar(
            centres, [100 * b["accuracy"] for b in full], width * 0.9, color="C0", label="accuracy of the bin"
        )
        ax.bar_label(bars, labels=[f"{percent(b['accuracy'])}\nn={b['n']}" for b in full], fontsize=6, padding=2)
        ax.plot(centres, [100 * b["confidence"] for b in full], "o", color="C1", ms=4, label="mean confidence")
        ax.plot([0, 100], [0, 100], "--", color="0.5", lw=1, label="calibrated")
        for b in bins:
            if b["n"] == 0:
                ax.text(50 * (b["lo"] + b["hi"]), 1.0, MISSING, ha="center", va="bottom", fontsize=6, color="0.35")
        ax.set_xlim(0, 100)
        ax.set_ylim(0, 118)
        ax.set_xlabel("confidence: fused probability of the answer (%)", fontsize=8)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{display_name(name)} (n={rel['n']}, ECE {percent(rel['ece'])}%)", fontsize=9)
        ax.legend(fontsize=6, loc="upper left", frameon=False)
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(title, fontsize=10)
    return fig


_STAGE2_PANELS = (
    ("kl", "mean KL (training steps)", False),
    ("entropy", "entropy (nats)", False),
    ("grad_norm", "gradient norm before clipping", True),
    ("reader_right_share", "reader-right share of candidates (%)", False),
    ("distinct_records", "distinct validation records", False),
)


def stage2_diagnostics_chart(runs: Mapping[str, Mapping], title: str):
    """Stage 2's per-epoch diagnostics, one line per head, one panel per quantity (mean KL, the
    target's and the retriever's entropy with ``log K`` dashed, the gradient norm on a log axis (linear when one is 0),
    the reader-right share in percent, the distinct validation records with epoch 0 the base
    retriever's). ``runs``: ``{head: RetrieverTrainResult.to_dict()}``; an epoch without a value
    (no evaluation) is left out of its line and marked ``n/a``."""
    from matplotlib.ticker import MaxNLocator

    fig = _new_figure(4.0 * len(_STAGE2_PANELS), 3.6)
    fig.set_layout_engine("constrained")
    axes = fig.subplots(1, len(_STAGE2_PANELS), squeeze=False)[0]
    for ax, (key, ylabel, log) in zip(axes, _STAGE2_PANELS):
        for i, (head, run) in enumerate(runs.items()):
            epochs = run["epochs"]
            n = (run.get("initial_eval") or {}).get("queries")
            label = f"{head} head" + ("" if n is None else f" (n={n})")
            diag = [(e["epoch"], e.get("diagnostics") or {}) for e in epochs]
            if key == "entropy":
                xs = [x for x, d in diag if d]
                ax.plot(xs, [d["target_entropy"] for _, d in diag if d], "o-", color=f"C{i}", label=f"{label}: target")
                ax.plot(
                    xs, [d["retriever_entropy"] for _, d in diag if d], "s:", color=f"C{i}", label=f"{label}: retriever"
                )
                ax.plot(
                    xs, [d["log_k"] for _, d in diag if d], "--", color="0.5", lw=1, label="log K" if i == 0 else None
                )
                continue
            if key == "distinct_records":
                evals = [(0, run.get("initial_eval"))] + [(e["epoch"], e.get("eval")) for e in epochs]
                points = [(x, ev[key]) for x, ev in evals if ev and ev.get(key) is not None]
            else:
                scale = 100.0 if key == "reader_right_share" else 1.0
                points = [(x, scale * d[key]) for x, d in diag if d.get(key) is not None]
            if points:
                ax.plot(*zip(*points), "o-", color=f"C{i}", label=label)
            else:
                ax.text(0.5, 0.5 + 0.1 * i, f"{head}: {MISSING}", transform=ax.transAxes, ha="center", color="0.35")
        if log and ax.lines and all(min(line.get_ydata()) > 0 for line in ax.lines):  # a zero norm: linear
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        if key in ("kl", "entropy"):  # the heads' colours are the same in every panel
            ax.legend(fontsize=6, frameon=False)
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(title, fontsize=10)
    return fig


def save_png(fig, path: str | os.PathLike, dpi: int = 100) -> str:
    """Write ``fig`` to ``path`` as a PNG, atomically; returns the path."""
    atomic_write_via(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
    return str(path)


def columns_label(columns: Sequence[str]) -> str:
    """The y-axis label of a table whose columns are metrics: ``accuracy / macro-F1 (%)``."""
    return " / ".join(display_name(c) for c in columns) + " (%)"
