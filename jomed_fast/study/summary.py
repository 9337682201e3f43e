"""The study's runs aggregated over seeds, per dataset: what ``study.document`` writes out.

For every system and baseline row, each metric's per-seed value with its 95% bootstrap interval
over the test queries, and the mean and sample standard deviation over seeds (``sd`` is None for
one seed). For every stated comparison (B minus A), the per-seed difference, its paired bootstrap
interval and McNemar's p, and how many seeds show a significant gain or loss (p < ``ALPHA``).
Beside them: the consistency split, the robustness rows and stage 2's diagnostics per seed.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

__all__ = ["ALPHA", "aggregate", "mean_sd"]

ALPHA = 0.05
METRICS = ("accuracy", "macro_f1")


def mean_sd(values: Sequence[float]) -> dict:
    """``{"mean", "sd"}`` of ``values`` (``sd``: the sample standard deviation, None for one value)."""
    if not values:
        raise ValueError("values: expected at least one, got 0")
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None}


def _systems(runs: Sequence[Mapping]) -> dict:
    out: dict = {}
    for name in runs[0]["systems"]:
        row = {}
        for m in METRICS:
            seeds = [r["systems"][name][m] for r in runs]
            row[m] = {**mean_sd([s["value"] for s in seeds]), "seeds": seeds}
        out[name] = row
    return out


def _comparisons(runs: Sequence[Mapping]) -> dict:
    out: dict = {}
    for key in runs[0]["comparisons"]:
        parts = {}
        for part in ("all", "inconsistent", "consistent"):
            cells = [r["comparisons"][key][part] for r in runs]
            present = [c for c in cells if c is not None]
            parts[part] = {
                "seeds": cells,
                "diff_accuracy": mean_sd([c["diff_accuracy"] for c in present]) if present else None,
                "significant_gain": sum(1 for c in present if c["p_mcnemar"] < ALPHA and c["diff_accuracy"] > 0),
                "significant_loss": sum(1 for c in present if c["p_mcnemar"] < ALPHA and c["diff_accuracy"] < 0),
            }
        out[key] = parts
    return out


def _robustness(runs: Sequence[Mapping]) -> dict:
    return {
        row: {
            m: {**mean_sd([r["robustness"][row][m] for r in runs]), "seeds": [r["robustness"][row][m] for r in runs]}
            for m in METRICS
        }
        for row in runs[0]["robustness"]
    }


def aggregate(by_dataset: Mapping[str, Sequence[Mapping]]) -> dict:
    """``{dataset: aggregate}`` of ``{dataset: [run summary per seed]}`` (``study.run``)."""
    out = {}
    for dataset, runs in by_dataset.items():
        if not runs:
            raise ValueError(f"{dataset}: expected at least one run, got 0")
        out[dataset] = {
            "seeds": [r["seed"] for r in runs],
            "counts": runs[0]["counts"],
            "queries": runs[0]["queries"],
            "knn_k": runs[0]["knn_k"],
            "systems": _systems(runs),
            "comparisons": _comparisons(runs),
            "share_inconsistent": [r["consistency"]["share_inconsistent"] for r in runs],
            "robustness": _robustness(runs),
            "answer_changed": [r["answer_changed"] for r in runs],
            "stage2": [r["stage2"] for r in runs],
            "supervised_selected": [r["supervised_selected"] for r in runs],
        }
    return out
