r"""Top-1 per retrieval head: one definition for ``evaluate`` and ``analyze``.

The text head scores a query against index captions and the image head against index images, so
their scores live on different scales and a top-1 over both (an argmax of raw scores across heads)
says which head's scale is larger, not which candidate is best. The top-1 is therefore per head:
for head :math:`h` and a query's candidates :math:`k` with head :math:`h_k` and score :math:`s_k`,

.. math:: \operatorname{top1}_h = \operatorname*{arg\,max}_{k\,:\,h_k = h} s_k

(the earliest candidate on a tie, which is the head's own rank order as retrieval lists it), and
its metrics are those of that candidate's prediction over the queries that have a candidate of
head :math:`h` (``None`` when none has: a system without that head, reader only, random records).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from .prediction_records import PredictionRecord

__all__ = ["HEADS", "head_top1", "head_top1_metrics"]

HEADS = ("text", "image")


def head_top1(record: PredictionRecord, head: str) -> int | None:
    """The index of ``record``'s highest-scoring candidate of ``head`` (None: it has none)."""
    if head not in HEADS:
        raise ValueError(f"head: expected one of {HEADS}, got {head!r}")
    best = None
    for k, c in enumerate(record.candidates):
        if c.head == head and (best is None or c.score > record.candidates[best].score):
            best = k
    return best


def head_top1_metrics(records: Sequence[PredictionRecord], head: str, num_classes: int | None = None) -> dict | None:
    """``prediction_metrics`` of each query's ``head`` top-1 prediction (its ``n``: the queries
    with a candidate of that head), or None when no query has one."""
    from ..eval import prediction_metrics

    picked = []
    for r in records:
        k = head_top1(r, head)
        if k is not None:
            picked.append(dataclasses.replace(r, fused=r.candidates[k].prediction))
    return prediction_metrics(picked, num_classes) if picked else None
