r"""Paired significance of the differences between two systems answering the same queries.

For systems A and B over the same N queries (matched by query id) with per-query correctness
:math:`a_i, b_i` of the fused answer (the same class, or for multi-label the same set, as the
consistency tables count it), every comparison reports

* the differences :math:`\Delta_{acc} = \bar b - \bar a` and :math:`\Delta_{F1}` of macro-F1 (over
  the C classes; per label for multi-label, as ``eval.predictions.prediction_metrics``), B minus A;
* the exact McNemar p-value of the accuracy difference (:func:`.rerankers.mcnemar_exact`: the
  two-sided binomial test on the queries exactly one of the two gets right);
* a paired bootstrap interval of each difference: ``n_boot`` resamples of the N query indices
  with replacement, the same resample for both systems, both differences recomputed on each, the
  interval the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the resampled
  differences (percentile bootstrap). The resamples come from ``numpy.random.default_rng(seed)``,
  drawn afresh for each comparison: a rerun gives the same intervals, and every comparison over
  the same queries sees the same resamples.

Macro-F1 on a resample weights query i by its count :math:`w_i` in it:
:math:`F_1^{(c)} = 2 TP_c / (2 TP_c + FP_c + FN_c)` with :math:`TP_c = \sum_i w_i [\hat y_i \ni c][y_i \ni c]`
(and so on), 0 where the denominator is 0, averaged over the C classes.

:func:`significance_table` compares every pair of systems (the later minus the earlier, in the
order given) and every system against every baseline (system minus baseline), per split
(``all``, ``inconsistent``, ``consistent``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from jomed_fast.data.io import atomic_write_text

from .._checks import is_int
from .consistency import _correct, check_same_queries
from .figures import display_name
from .prediction_records import PredictionRecord
from .rerankers import mcnemar_exact

__all__ = [
    "DEFAULT_BOOTSTRAP",
    "SPLITS",
    "bootstrap_interval",
    "compare_paired",
    "paired_bootstrap",
    "significance_markdown",
    "significance_table",
    "write_significance",
]

DEFAULT_BOOTSTRAP = 2000
SPLITS = ("all", "inconsistent", "consistent")
_CELLS_PER_CHUNK = 1 << 22  # resamples x queries per chunk of counts (32 MiB of float64)


def _indicators(values: Sequence, num_classes: int, name: str) -> np.ndarray:
    """``[N, C]`` float64: row i marks the class (or the label set) of ``values[i]``; ``None``: none."""
    m = np.zeros((len(values), num_classes), dtype=np.float64)
    for i, v in enumerate(values):
        if v is None:
            continue
        for c in [v] if is_int(v) or isinstance(v, np.integer) else list(v):
            if not 0 <= int(c) < num_classes:
                raise ValueError(f"{name}[{i}]: expected class indices in 0..{num_classes - 1}, got {v!r}")
            m[i, int(c)] = 1.0
    return m


def _macro_f1(weights: np.ndarray, pred: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """``[B]`` macro-F1 of ``pred`` against ``gold`` (``[N, C]`` indicators) under query weights ``[B, N]``."""
    tp = weights @ (pred * gold)
    fp = weights @ (pred * (1 - gold))
    fn = weights @ ((1 - pred) * gold)
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1e-300), 0.0).mean(axis=1)


def _aligned(a: Sequence[PredictionRecord], b: Sequence[PredictionRecord]) -> tuple[list, list]:
    check_same_queries({"a": a, "b": b})
    by_id = {r.query_id: r for r in b}
    return list(a), [by_id[r.query_id] for r in a]


def _check_resampling(n_boot: int, confidence: float) -> None:
    if not is_int(n_boot) or n_boot < 1:
        raise ValueError(f"--bootstrap: expected an int >= 1 resamples, got {n_boot!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: expected a level in (0, 1), got {confidence!r}")


def _answers(records: Sequence[PredictionRecord], num_classes: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(pred [N, C] indicators, hit [N] 0/1)`` of one system's fused answers."""
    if not records:
        raise ValueError(f"records: {what} needs at least one query, got 0")
    if any(r.kind == "vqa_open" for r in records):
        raise ValueError(f"records: {what} needs a class set (open VQA has none)")
    pred = _indicators([r.fused for r in records], num_classes, "fused")
    return pred, np.array([_correct(r.fused, r) for r in records], np.float64)


def _resamples(n: int, n_boot: int, seed: int):
    """The ``n_boot`` resamples of ``n`` query indices, as ``[m, n]`` float64 counts per chunk."""
    rng = np.random.default_rng(seed)
    chunk = max(1, _CELLS_PER_CHUNK // n)
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(m, n))
        weights = np.bincount((np.arange(m)[:, None] * n + idx).ravel(), minlength=m * n).reshape(m, n)
        yield weights.astype(np.float64)


def _metric_samples(gold: np.ndarray, systems: Sequence[tuple], n_boot: int, seed: int) -> tuple[list, list]:
    """For each system ``(pred, hit)`` over the same queries: its accuracy and macro-F1
    (``{metric: value}``) and their values on every resample (``{metric: [n_boot]}``), all systems
    on the same resamples."""
    n = len(gold)
    ones = np.ones((1, n))
    points = [
        {"accuracy": float(hit.mean()), "macro_f1": float(_macro_f1(ones, pred, gold)[0])} for pred, hit in systems
    ]
    samples: list[dict[str, list[np.ndarray]]] = [{"accuracy": [], "macro_f1": []} for _ in systems]
    for weights in _resamples(n, n_boot, seed):
        for (pred, hit), sample in zip(systems, samples):
            sample["accuracy"].append(weights @ hit / n)
            sample["macro_f1"].append(_macro_f1(weights, pred, gold))
    return points, [{m: np.concatenate(v) for m, v in sample.items()} for sample in samples]


def _percentiles(values: np.ndarray, confidence: float) -> list[float]:
    return [float(x) for x in np.quantile(values, [(1 - confidence) / 2, (1 + confidence) / 2])]


def paired_bootstrap(
    a: Sequence[PredictionRecord],
    b: Sequence[PredictionRecord],
    num_classes: int,
    *,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """``{"accuracy", "macro_f1"}``, each ``{"diff": B - A, "ci": [lo, hi]}``: the paired percentile
    bootstrap of the module docstring over the queries ``a`` and ``b`` share (matched by id)."""
    _check_resampling(n_boot, confidence)
    a, b = _aligned(a, b)
    systems = [_answers(a, num_classes, "the paired bootstrap"), _answers(b, num_classes, "the paired bootstrap")]
    gold = _indicators([r.gold for r in a], num_classes, "gold")
    (pa, pb), (sa, sb) = _metric_samples(gold, systems, n_boot, seed)
    return {m: {"diff": pb[m] - pa[m], "ci": _percentiles(sb[m] - sa[m], confidence)} for m in ("accuracy", "macro_f1")}


def bootstrap_interval(
    records: Sequence[PredictionRecord],
    num_classes: int,
    *,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """``{"accuracy", "macro_f1"}``, each ``{"value", "ci": [lo, hi]}``: one system's metric with
    the percentile bootstrap interval over its queries (the resamples of :func:`paired_bootstrap`)."""
    _check_resampling(n_boot, confidence)
    system = _answers(records, num_classes, "the bootstrap interval")
    gold = _indicators([r.gold for r in records], num_classes, "gold")
    (point,), (sample,) = _metric_samples(gold, [system], n_boot, seed)
    return {m: {"value": point[m], "ci": _percentiles(sample[m], confidence)} for m in ("accuracy", "macro_f1")}


def compare_paired(
    a: Sequence[PredictionRecord],
    b: Sequence[PredictionRecord],
    num_classes: int,
    *,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> dict:
    """One comparison, B against A: ``n``, both accuracies, the queries only A / only B gets right,
    the McNemar p and the bootstrap differences with their 95% intervals (the module docstring)."""
    a, b = _aligned(a, b)
    hits_a = [_correct(r.fused, r) for r in a]
    hits_b = [_correct(r.fused, r) for r in b]
    boot = paired_bootstrap(a, b, num_classes, n_boot=n_boot, seed=seed)
    return {
        "n": len(a),
        "accuracy_a": float(np.mean(hits_a)),
        "accuracy_b": float(np.mean(hits_b)),
        "only_a": sum(1 for x, y in zip(hits_a, hits_b) if x and not y),
        "only_b": sum(1 for x, y in zip(hits_a, hits_b) if y and not x),
        "p_mcnemar": mcnemar_exact(hits_b, hits_a),
        "diff_accuracy": boot["accuracy"]["diff"],
        "ci95_accuracy": boot["accuracy"]["ci"],
        "diff_macro_f1": boot["macro_f1"]["diff"],
        "ci95_macro_f1": boot["macro_f1"]["ci"],
    }


def significance_table(
    systems: Mapping[str, Sequence[PredictionRecord]],
    split: Mapping[str, set],
    num_classes: int,
    baselines: Mapping[str, Sequence[PredictionRecord]] | None = None,
    *,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> dict:
    """``{"B vs A": {"a", "b", split: compare_paired(...) | None}}`` for every later system B
    against every earlier A, then every system B against every baseline A; a split with no query
    is ``None``."""
    names = list(systems)
    pairs = [(names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))]
    pairs += [(base, name) for name in names for base in (baselines or {})]
    every = {**(baselines or {}), **systems}
    if len(every) != len(systems) + len(baselines or {}):
        raise ValueError(f"baselines: a baseline takes a system's name ({sorted(set(systems) & set(baselines or {}))})")
    check_same_queries(every, dict(split))
    table: dict = {}
    for a, b in pairs:
        row: dict = {"a": a, "b": b}
        for s in SPLITS:
            keep = None if s == "all" else split[s]
            ra = [r for r in every[a] if keep is None or r.query_id in keep]
            rb = [r for r in every[b] if keep is None or r.query_id in keep]
            row[s] = compare_paired(ra, rb, num_classes, n_boot=n_boot, seed=seed) if ra else None
        table[f"{b} vs {a}"] = row
    return table


def _signed(x: float) -> str:
    return f"{100 * x:+.1f}"


def _cell_text(cell: dict | None, metric: str) -> str:
    if cell is None:
        return "-"
    lo, hi = cell[f"ci95_{metric}"]
    return f"{_signed(cell[f'diff_{metric}'])} [{_signed(lo)}, {_signed(hi)}]"


def significance_markdown(table: Mapping[str, Mapping], n_boot: int, seed: int) -> str:
    """One row per comparison and split: the differences with their intervals, McNemar's p and n."""
    lines = [
        "| comparison | split | Δ accuracy [95% CI] | McNemar p | Δ macro-F1 [95% CI] | n |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in table.values():
        label = f"{display_name(row['b'])} vs {display_name(row['a'])}"
        for s in SPLITS:
            cell = row[s]
            p = "-" if cell is None else f"{cell['p_mcnemar']:.3g}"
            n = "-" if cell is None else str(cell["n"])
            lines.append(
                f"| {label} | {s} | {_cell_text(cell, 'accuracy')} | {p} | {_cell_text(cell, 'macro_f1')} | {n} |"
            )
    lines += [
        "",
        "Differences in percentage points, the first system minus the second; p: exact McNemar test on "
        f"per-query correctness; intervals: paired percentile bootstrap, {n_boot} resamples, seed {seed}.",
    ]
    return "\n".join(lines) + "\n"


def write_significance(
    out_dir: str, table: Mapping[str, Mapping], n_boot: int, seed: int, name: str = "significance"
) -> dict[str, str]:
    """``name.json`` (every cell, the comparisons in order: the JSON sorts its keys, and how it was
    made) and ``name.md`` (atomic)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, name + ".json"), "md": os.path.join(out_dir, name + ".md")}
    how = {
        "diff": "the first system (b) minus the second (a)",
        "p_mcnemar": "exact McNemar test on per-query correctness",
        "ci95": f"paired percentile bootstrap over the queries, {n_boot} resamples, seed {seed}",
    }
    atomic_write_text(
        paths["json"], json.dumps({"table": table, "comparisons": list(table), "how": how}, indent=2, sort_keys=True)
    )
    atomic_write_text(paths["md"], significance_markdown(table, n_boot, seed))
    return paths
