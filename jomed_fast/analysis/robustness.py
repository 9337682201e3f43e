"""Robustness (paper Table 7): the same metrics for the system and its ablations side by side.

The ablations are prediction files made with ``infer.predict`` settings (``retrieval="none"``,
``retrieval="random"``, ``query_image=False``); the uniform-random classifier is computed here:
each query's answer drawn uniformly from the task's classes (any non-empty label subset with
probability 1/2 per label for multi-label) with a fixed seed, so its row is reproducible.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from ..eval.predictions import prediction_metrics
from .prediction_records import PredictionRecord

__all__ = ["metrics_table", "uniform_random_records"]


def uniform_random_records(records: Sequence[PredictionRecord], num_classes: int, seed: int = 0) -> list:
    """Copies of ``records`` whose fused answer is drawn uniformly at random (no candidates kept)."""
    if num_classes < 1:
        raise ValueError(f"num_classes: expected >= 1, got {num_classes}")
    rng = np.random.default_rng(seed)
    out = []
    for r in records:
        if r.kind == "vqa_open":
            raise ValueError("records: a uniform-random classifier needs a class set (open VQA has none)")
        pick: int | list[int]
        if r.kind == "multilabel":
            pick = [int(i) for i in np.flatnonzero(rng.random(num_classes) < 0.5)] or [int(rng.integers(num_classes))]
        else:
            pick = int(rng.integers(num_classes))
        out.append(dataclasses.replace(r, candidates=[], fused=pick, fused_probs=None))
    return out


def metrics_table(systems: Mapping[str, Sequence[PredictionRecord]], num_classes: int | None = None) -> dict:
    """``{system: {metric: value}}`` with the kind's headline metrics (accuracy / subset accuracy,
    macro-F1; exact match and token F1 for open VQA), in the order given."""
    table = {}
    for name, recs in systems.items():
        m = prediction_metrics(recs, num_classes)
        table[name] = {k: v for k, v in m.items() if k != "n"}
    return table
