"""Inconsistent/consistent split, oracle, reranking baselines, and writing results.

A query is *inconsistent* when its K candidates do not all give the same answer. The split is
fixed once from one system's candidates (after stage 1) and every system is measured on it;
:func:`inconsistency_shares` gives each system's own rate. Tables are written as JSON, markdown
(percent, one decimal) and a chart (:mod:`.figures`) that shows the same numbers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from jomed_fast.data.io import atomic_write_text
from jomed_fast.eval.metrics import normalize_answer

from .figures import ChartSpec, bar_chart, display_name, percent, save_png
from .head_top1 import head_top1
from .prediction_records import PredictionRecord

# returns the index of the chosen candidate, or None when the reranker has nothing to choose from
# (the per-head top-1 of a record without a candidate of that head): the record is left out
Reranker = Callable[[PredictionRecord], int | None]


def _key(pred, kind):
    if kind == "multilabel":
        return frozenset(pred)
    if kind == "vqa_open":
        return normalize_answer(str(pred))
    return pred


def _correct(pred, rec: PredictionRecord) -> bool:
    return _key(pred, rec.kind) == _key(rec.gold, rec.kind)


def is_inconsistent(rec: PredictionRecord) -> bool:
    return len({_key(c.prediction, rec.kind) for c in rec.candidates}) > 1


def _ids(name: str, records: Sequence[PredictionRecord]) -> set:
    seen: set = set()
    for i in (r.query_id for r in records):
        if i in seen:
            raise ValueError(f"systems[{name!r}]: query id {i!r} appears more than once (one record per query)")
        seen.add(i)
    return seen


def check_same_queries(systems: Mapping[str, Sequence[PredictionRecord]], split: dict[str, set] | None = None) -> set:
    """The query ids every system shares; ``ValueError`` when a system repeats a query id, or when two
    systems (or a system and ``split``) cover other queries.

    Refused rather than reported: every table compares systems row by row, and numbers over two query
    sets look comparable but are not (a system that skipped its hard queries would look better). The
    fix is cheap: ``predict`` resumes, so rerunning it on the full samples fills in what is missing.
    """
    sets = {name: _ids(name, recs) for name, recs in systems.items()}
    if split is not None:
        sets = {"the split": set(split["inconsistent"]) | set(split["consistent"]), **sets}
    if not sets:
        return set()
    ref, want = next(iter(sets.items()))
    for name, got in sets.items():
        if got != want:
            lacks, extra = sorted(want - got), sorted(got - want)
            raise ValueError(
                f"systems: {name!r} covers other queries than {ref!r} ({len(lacks)} missing, e.g. "
                f"{lacks[:3]}; {len(extra)} extra, e.g. {extra[:3]}); predict every system on the "
                "same samples (a rerun of predict resumes and fills in what is missing)"
            )
    return want


def split_consistency(records: Sequence[PredictionRecord]) -> dict[str, set]:
    """Query ids per split; fix it once (after stage 1) and reuse it for every system."""
    inc = {r.query_id for r in records if is_inconsistent(r)}
    return {"inconsistent": inc, "consistent": {r.query_id for r in records} - inc}


def split_metrics(
    systems: Mapping[str, Sequence[PredictionRecord]],
    split: dict[str, set],
    metric: str = "accuracy",
    num_classes: int | None = None,
) -> dict:
    """A fused-prediction metric per system and split, plus the share of inconsistent queries.

    ``metric``: ``"accuracy"`` (exact match of the fused answer; subset accuracy for multi-label)
    or ``"macro_f1"`` (over the task's classes; per-label for multi-label), as the paper's
    Tables 5 and 6 report both. Every system must cover the split's queries, once each
    (:func:`check_same_queries`).
    """
    if metric not in ("accuracy", "macro_f1"):
        raise ValueError(f"metric: expected 'accuracy' or 'macro_f1', got {metric!r}")
    from jomed_fast.eval.predictions import prediction_metrics

    check_same_queries(systems, split)
    n_all = len(split["inconsistent"]) + len(split["consistent"])
    out: dict = {"share_inconsistent": len(split["inconsistent"]) / max(n_all, 1), "metric": metric, "systems": {}}
    out["n"] = {"all": n_all, "inconsistent": len(split["inconsistent"]), "consistent": len(split["consistent"])}
    for name, recs in systems.items():
        row: dict[str, float | None] = {}
        for s in ("all", "inconsistent", "consistent"):
            rs = [r for r in recs if s == "all" or r.query_id in split[s]]
            if not rs:
                row[s] = None
            elif metric == "accuracy":
                row[s] = float(np.mean([_correct(r.fused, r) for r in rs]))
            else:
                row[s] = prediction_metrics(rs, num_classes)["macro_f1"]
        out["systems"][name] = row
    return out


def oracle_correct(rec: PredictionRecord) -> bool:
    return any(_correct(c.prediction, rec) for c in rec.candidates)


def oracle_accuracy(records: Sequence[PredictionRecord]) -> float:
    if not records:
        raise ValueError("records: expected at least one record, got 0")
    return float(np.mean([oracle_correct(r) for r in records]))


def rerank_top_text(rec: PredictionRecord) -> int | None:
    """The text head's top-1 (:mod:`.head_top1`: scores are compared within a head only)."""
    return head_top1(rec, "text")


def rerank_top_image(rec: PredictionRecord) -> int | None:
    """The image head's top-1 (:mod:`.head_top1`)."""
    return head_top1(rec, "image")


def rerank_top_confidence(rec: PredictionRecord) -> int:
    return int(np.argmax([max(c.probs) if c.probs else -np.inf for c in rec.candidates]))


def rerank_fusion(rec: PredictionRecord):
    """Not a pick: the record's fused prediction (marker used by ``rerank_accuracy``)."""
    return rec.fused


def inconsistency_shares(systems: Mapping[str, Sequence[PredictionRecord]]) -> dict:
    """``{system: {"inconsistent", "consistent"}}``: the share of each system's queries whose own
    candidates disagree (and agree); ``None`` for a system that never has two candidates to compare
    (reader only, no retrieval)."""
    out: dict[str, dict[str, float | None]] = {}
    for name, recs in systems.items():
        comparable = [r for r in recs if len(r.candidates) > 1]
        share = float(np.mean([is_inconsistent(r) for r in comparable])) if comparable else None
        out[name] = {"inconsistent": share, "consistent": None if share is None else 1.0 - share}
    return out


def rerank_accuracy(records: Sequence[PredictionRecord], rerankers: Mapping[str, Reranker]) -> dict[str, float | None]:
    """Accuracy of each reranker's chosen candidate (``rerank_fusion`` scores the fused answer) over
    the records it chose one for (None: it chose for none)."""
    out = {}
    for name, fn in rerankers.items():
        hits = []
        for r in records:
            if fn is rerank_fusion:
                hits.append(_correct(r.fused, r))
                continue
            k = fn(r)
            if k is None:
                continue
            if not isinstance(k, (int, np.integer)) or not 0 <= k < len(r.candidates):
                raise ValueError(
                    f"rerankers[{name!r}]: expected a candidate index in 0..{len(r.candidates) - 1}, got {k!r}"
                )
            hits.append(_correct(r.candidates[k].prediction, r))
        out[name] = float(np.mean(hits)) if hits else None
    return out


def _markdown_table(table: Mapping[str, Mapping[str, float | None]]) -> str:
    cols = list(next(iter(table.values())).keys()) if table else []
    lines = ["| system | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for row, vals in table.items():
        lines.append(f"| {row} | " + " | ".join(percent(vals[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def write_analysis(
    out_dir: str,
    name: str,
    table: Mapping[str, Mapping[str, float | None]],
    extra: dict | None = None,
    plot: bool = True,
    *,
    title: str | None = None,
    ylabel: str = "accuracy (%)",
    column_n: Mapping[str, int] | None = None,
    row_n: Mapping[str, int] | None = None,
) -> dict[str, str]:
    """Write ``name.json`` (atomic), ``name.md`` (rows x columns, percent) and optionally ``name.png``
    (:func:`.figures.bar_chart`: ``title``, default the table's name; ``ylabel`` the metric;
    ``column_n`` / ``row_n`` the queries behind each group / series)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, name + ".json"), "md": os.path.join(out_dir, name + ".md")}
    atomic_write_text(paths["json"], json.dumps({"table": table, **(extra or {})}, indent=2, sort_keys=True))
    atomic_write_text(paths["md"], _markdown_table(table))
    if plot and table:
        spec = ChartSpec(title or display_name(name), ylabel, column_n=column_n, row_n=row_n)
        paths["png"] = save_png(bar_chart(table, spec), os.path.join(out_dir, name + ".png"))
    return paths


# The paper's Table 8 rerankers (an external one is any ``Reranker`` added to this mapping).
PAPER_RERANKERS: dict[str, Reranker] = {
    "top1_text": rerank_top_text,
    "top1_image": rerank_top_image,
    "top1_confidence": rerank_top_confidence,
    "fusion": rerank_fusion,
}


def _capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


def write_consistency_tables(
    out_dir: str,
    systems: Mapping[str, Sequence[PredictionRecord]],
    split: dict[str, set],
    num_classes: int | None = None,
    extra: dict | None = None,
) -> dict:
    """Tables 5-6: accuracy and macro-F1 per split for every system, each written by
    :func:`write_analysis` as ``consistency_<metric>`` (the groups' n in the chart), and each
    system's own share of inconsistent queries as ``consistency_split``; returns
    ``{metric: split_metrics(...)}``."""
    out = {}
    where = f", split from {display_name(extra['split_from'])}" if extra and "split_from" in extra else ""
    for metric in ("accuracy", "macro_f1"):
        res = split_metrics(systems, split, metric, num_classes)
        write_analysis(
            out_dir,
            f"consistency_{metric}",
            res["systems"],
            extra={"share_inconsistent": res["share_inconsistent"], **(extra or {})},
            title=(
                f"{_capitalised(display_name(metric))} of the fused answer by split "
                f"({percent(res['share_inconsistent'])}% of queries inconsistent{where})"
            ),
            ylabel=f"{display_name(metric)} (%)",
            column_n=res["n"],
        )
        out[metric] = res
    write_analysis(
        out_dir,
        "consistency_split",
        inconsistency_shares(systems),
        extra=extra,
        title="Queries whose candidates disagree (inconsistent) or agree, by system",
        ylabel="share of queries (%)",
        row_n={name: len(recs) for name, recs in systems.items()},
    )
    return out
