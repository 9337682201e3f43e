"""Inconsistent/consistent split, oracle, and writing results (the rerankers: :mod:`.rerankers`).

A query is *inconsistent* when its K candidates do not all give the same answer (for multi-label,
not all the same label set). The split is
fixed once from one system's candidates (after stage 1) and every system is measured on it. The
*oracle* answers each query with its best candidate (:func:`oracle_pick`): accuracy counts a query
when some candidate is right (the same set, for multi-label), F1 scores those picks;
:func:`inconsistency_shares` gives each system's own rate. Tables are written as JSON, markdown
(percent, one decimal) and a chart (:mod:`.figures`) that shows the same numbers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from jomed_fast.data.io import atomic_write_text
from jomed_fast.eval.metrics import normalize_answer

from .figures import ChartSpec, bar_chart, display_name, percent, save_png
from .prediction_records import PredictionRecord


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
    """Some candidate's prediction is the gold answer: the same class, or for multi-label the same
    *set* (the oracle's accuracy is a subset accuracy: a candidate that names part of the gold set
    does not count)."""
    return any(_correct(c.prediction, rec) for c in rec.candidates)


def oracle_accuracy(records: Sequence[PredictionRecord]) -> float:
    if not records:
        raise ValueError("records: expected at least one record, got 0")
    return float(np.mean([oracle_correct(r) for r in records]))


def _overlap_f1(pred, gold) -> float:
    """The F1 of one predicted label set against the gold set: ``2 |P ∩ G| / (|P| + |G|)``."""
    p, g = frozenset(pred), frozenset(gold)
    return 2 * len(p & g) / (len(p) + len(g)) if p or g else 1.0


def oracle_pick(rec: PredictionRecord) -> int:
    """The oracle's candidate of one query: the first whose prediction is right, else (multi-label)
    the first whose predicted set has the highest F1 against the gold set, else candidate 0."""
    if rec.kind == "vqa_open":
        raise ValueError(f"records: the oracle is not defined for open VQA (query {rec.query_id!r})")
    if not rec.candidates:
        raise ValueError(f"records: query {rec.query_id!r} has no candidates to pick from")
    if rec.kind == "multilabel":
        return int(np.argmax([_overlap_f1(c.prediction, rec.gold) for c in rec.candidates]))
    return next((k for k, c in enumerate(rec.candidates) if _correct(c.prediction, rec)), 0)


def oracle_f1(records: Sequence[PredictionRecord], num_classes: int | None = None) -> float:
    """The macro-F1 (over the C classes; per label for multi-label, as ``prediction_metrics``) of
    the oracle's picks: each query answered by its best candidate (:func:`oracle_pick`). A query
    with a right candidate is answered right, as in :func:`oracle_accuracy`; for multi-label a
    query without one keeps the candidate set closest to the gold set."""
    from jomed_fast.eval.predictions import prediction_metrics

    if not records:
        raise ValueError("records: expected at least one record, got 0")
    picked = [
        PredictionRecord(r.query_id, r.gold, r.kind, [], r.candidates[oracle_pick(r)].prediction, r.fused_probs)
        for r in records
    ]
    if num_classes is None:
        num_classes = next((len(c.probs) for r in records for c in r.candidates if c.probs), None)
    return float(prediction_metrics(picked, num_classes)["macro_f1"])


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


def _capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


def write_consistency_tables(
    out_dir: str,
    systems: Mapping[str, Sequence[PredictionRecord]],
    split: dict[str, set],
    num_classes: int | None = None,
    extra: dict | None = None,
    baselines: Mapping[str, Sequence[PredictionRecord]] | None = None,
) -> dict:
    """Tables 5-6: accuracy and macro-F1 per split for every system, then every baseline
    (:mod:`.baselines`, rows of those two tables only), each written by :func:`write_analysis` as
    ``consistency_<metric>`` (the groups' n in the chart), and each system's own share of
    inconsistent queries as ``consistency_split``; returns ``{metric: split_metrics(...)}``."""
    out = {}
    where = f", split from {display_name(extra['split_from'])}" if extra and "split_from" in extra else ""
    clash = sorted(set(systems) & set(baselines or {}))
    if clash:
        raise ValueError(f"baselines: the names {clash} are systems' names; name each row once")
    for metric in ("accuracy", "macro_f1"):
        res = split_metrics({**systems, **(baselines or {})}, split, metric, num_classes)
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
