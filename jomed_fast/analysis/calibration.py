r"""Calibration of the fused probabilities: the reliability diagram's bins and the expected
calibration error, from the prediction records' ``fused_probs``.

For a single-label record (binary, multi-class, closed VQA) with fused class distribution
:math:`p \in \Delta^{C}` and fused answer :math:`\hat y` (``fused``), the confidence is
:math:`c = p_{\hat y}` and the outcome :math:`o = [\hat y = y]`. With M equal-width bins
:math:`B_m = [m/M, (m+1)/M)` (the last one closed at 1), N records and :math:`n_m = |B_m|`:

.. math::
    \mathrm{conf}_m = \tfrac{1}{n_m} \textstyle\sum_{i \in B_m} c_i, \qquad
    \mathrm{acc}_m = \tfrac{1}{n_m} \textstyle\sum_{i \in B_m} o_i, \qquad
    \mathrm{ECE} = \textstyle\sum_m \tfrac{n_m}{N} \, |\mathrm{acc}_m - \mathrm{conf}_m|

An empty bin has no confidence and no accuracy (``None``), not zero. Multi-label and open VQA
records have no single class distribution to read a confidence from, so they have no diagram.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from .._checks import check_int
from ..data.io import atomic_write_text
from .figures import percent, reliability_chart, save_png
from .prediction_records import PredictionRecord

__all__ = ["SINGLE_LABEL_KINDS", "reliability", "write_calibration"]

SINGLE_LABEL_KINDS = ("binary", "multiclass", "vqa_closed")


def _confidences(records: Sequence[PredictionRecord]) -> tuple[np.ndarray, np.ndarray] | None:
    """``(c [N], o [N])`` or None when the records are not single-label with fused probabilities."""
    if not records or any(r.kind not in SINGLE_LABEL_KINDS or not r.fused_probs for r in records):
        return None
    conf = np.array([r.fused_probs[int(r.fused)] for r in records], dtype=np.float64)  # type: ignore[index]
    hit = np.array([int(r.fused) == int(r.gold) for r in records], dtype=np.float64)
    return conf, hit


def reliability(records: Sequence[PredictionRecord], bins: int = 10) -> dict | None:
    """``{"n", "ece", "bins": [{"lo", "hi", "n", "confidence", "accuracy"}]}`` of ``records`` (see
    the module docstring), or None when they carry no single-label fused distribution."""
    check_int("bins", bins, 1)
    got = _confidences(records)
    if got is None:
        return None
    conf, hit = got
    edges = np.arange(bins + 1, dtype=np.float64) / bins
    # the edges at or below c, less one: B_m = [edges[m], edges[m+1]); c = 1 joins the last bin
    which = np.minimum(np.searchsorted(edges, conf, side="right") - 1, bins - 1)
    out, ece = [], 0.0
    for m in range(bins):
        inside = which == m
        n = int(inside.sum())
        confidence = float(conf[inside].mean()) if n else None
        accuracy = float(hit[inside].mean()) if n else None
        if confidence is not None and accuracy is not None:
            ece += n / len(conf) * abs(accuracy - confidence)
        out.append(
            {"lo": float(edges[m]), "hi": float(edges[m + 1]), "n": n, "confidence": confidence, "accuracy": accuracy}
        )
    return {"n": len(conf), "ece": ece, "bins": out}


def _markdown(table: Mapping[str, dict]) -> str:
    lines = []
    for name, rel in table.items():
        lines += [
            f"### {name} (n={rel['n']}, ECE {percent(rel['ece'])})",
            "",
            "| confidence bin | n | mean confidence | accuracy |",
            "|---|---:|---:|---:|",
        ]
        for b in rel["bins"]:
            lines.append(
                f"| {percent(b['lo'])}-{percent(b['hi'])} | {b['n']} | {percent(b['confidence'])} "
                f"| {percent(b['accuracy'])} |"
            )
        lines.append("")
    return "\n".join(lines)


def write_calibration(
    out_dir: str | os.PathLike, systems: Mapping[str, Sequence[PredictionRecord]], bins: int = 10, plot: bool = True
) -> dict:
    """``calibration.json`` / ``.md`` / ``.png`` (one reliability panel per system) for the systems
    whose records carry single-label fused probabilities; returns ``{system: reliability(...)}``
    (empty, and nothing written, when none does)."""
    table = {}
    for name, recs in systems.items():
        rel = reliability(recs, bins)
        if rel is not None:
            table[name] = rel
    if not table:
        return table
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(os.path.join(out_dir, "calibration.json"), json.dumps({"bins": bins, "systems": table}, indent=2))
    atomic_write_text(os.path.join(out_dir, "calibration.md"), _markdown(table))
    if plot:
        save_png(
            reliability_chart(table, "Reliability of the fused probabilities"),
            os.path.join(out_dir, "calibration.png"),
        )
    return table
