"""Writing Table 8 (:func:`.rerankers.rerank_table` of each system) as JSON, markdown and PNG.

``NAME.json`` holds every cell (accuracy, n, hits, 95% Wilson interval, picks that named no
candidate, McNemar p against fusion) and how the table was made; ``NAME.md`` one table per system,
each cell ``accuracy [interval] n=…`` in percent; ``NAME.png`` the inconsistent split, the part
the paper reports: one group per reranker, one bar per system.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from jomed_fast.data.io import atomic_write_text

from .figures import ChartSpec, bar_chart, display_name, percent, save_png
from .rerankers import ORACLE, SPLITS

__all__ = ["HOW", "rerank_markdown", "write_rerank_tables"]

# What a reader of the table needs to know to read it, written into its JSON and markdown.
HOW = {
    "split": "each system's own candidates: inconsistent where their predictions disagree",
    "top1_retrieval": "across heads by each head's retrieval softmax over its own candidates (tau 1)",
    "top1_retrieval_text, top1_retrieval_image": "the best retrieval score within one head",
    "ci95": "Wilson score interval",
    "p_vs_fusion": "exact McNemar test against fusion on the same queries",
    "no_choice": "picks that named no valid candidate, scored as wrong",
}


def _cell_text(cell: dict | None) -> str:
    if cell is None:
        return "-"
    lo, hi = cell["ci95"]
    text = f"{percent(cell['accuracy'])} [{percent(lo)}, {percent(hi)}] n={cell['n']}"
    if cell.get("no_choice"):
        text += f", {cell['no_choice']} no choice"
    if "p_vs_fusion" in cell:
        text += f", p={cell['p_vs_fusion']:.3g}"
    return text


def rerank_markdown(
    tables: Mapping[str, Mapping[str, Mapping[str, dict | None]]], notes: Mapping[str, str] = HOW
) -> str:
    """One markdown table per system (rows: rerankers; columns: :data:`.rerankers.SPLITS`), then ``notes``."""
    lines = []
    for system, table in tables.items():
        lines += [f"#### {display_name(system)}", "", "| reranker | " + " | ".join(SPLITS) + " |"]
        lines.append("|---|" + "---:|" * len(SPLITS))
        for row, cells in table.items():
            lines.append(f"| {display_name(row)} | " + " | ".join(_cell_text(cells[s]) for s in SPLITS) + " |")
        lines.append("")
    lines += ["Accuracy in percent, [95% interval], n queries; p: against fusion.", ""]
    lines += [f"- {key}: {text}" for key, text in notes.items()]
    return "\n".join(lines) + "\n"


def write_rerank_tables(
    out_dir: str,
    tables: Mapping[str, Mapping[str, Mapping[str, dict | None]]],
    name: str = "rerank",
    *,
    title: str = "Table 8: one candidate picked vs fusion, inconsistent queries",
    notes: Mapping[str, str] | None = None,
    plot: bool = True,
) -> dict[str, str]:
    """Write ``name.json`` / ``.md`` / ``.png`` (atomic) for ``{system: rerank_table(...)}``."""
    notes = {**HOW, **(notes or {})}
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, name + ".json"), "md": os.path.join(out_dir, name + ".md")}
    atomic_write_text(paths["json"], json.dumps({"table": tables, "how": notes}, indent=2, sort_keys=True))
    atomic_write_text(paths["md"], rerank_markdown(tables, notes))
    if plot and tables:
        rows = list(dict.fromkeys(row for table in tables.values() for row in table))
        chart: dict[str, dict[str, float | None]] = {}
        row_n: dict[str, int] = {}
        for system, table in tables.items():
            cells = {row: (table.get(row) or {}).get("inconsistent") for row in rows}
            chart[system] = {row: None if c is None else c["accuracy"] for row, c in cells.items()}
            every = table[ORACLE]["inconsistent"]  # the oracle row has every query of the split
            row_n[system] = 0 if every is None else every["n"]
        spec = ChartSpec(title, "accuracy on the inconsistent queries (%)", row_n=row_n)
        paths["png"] = save_png(bar_chart(chart, spec), os.path.join(out_dir, name + ".png"))
    return paths
