"""Metrics of a set of prediction records (``analysis.prediction_records.PredictionRecord``), by task kind.

* binary, multi-class, closed VQA: ``accuracy`` and ``macro_f1`` over the ``C`` classes;
* multi-label: ``subset_accuracy`` (exact set match, the reference's accuracy) and ``macro_f1``,
  the F1 of each label's indicator column averaged over the C labels (scikit-learn's
  ``f1_score(average="macro")`` on indicator matrices). That is the F1 of the paper's Table 3:
  PAPER.md's metrics give classification as "accuracy and macro-F1 over the C classes" and
  multi-label as "F1" beside it, with no other averaging named; and the reported VinDr-PCXR
  numbers (ACC .48-.57, F1 .08-.14) fit a per-label average, where the rare labels' F1 near 0
  pulls the mean down, not a micro or per-sample F1, which the frequent "No finding" would keep
  near the accuracy;
* open VQA: ``exact_match`` and token ``recall`` / ``precision`` / ``f1`` (SQuAD-normalised).

Each query counts once: a query id that appears twice is an error, not a second example.
``C`` comes from the records (the length of their class distributions) unless given.
"""

from __future__ import annotations

from collections.abc import Sequence

from .metrics import (
    accuracy,
    exact_match,
    macro_f1,
    multilabel_macro_f1,
    open_token_scores,
    subset_accuracy,
)

__all__ = ["prediction_metrics"]


def _num_classes(records) -> int:
    for r in records:
        if r.fused_probs:
            return len(r.fused_probs)
        for c in r.candidates:
            if c.probs:
                return len(c.probs)
    raise ValueError("num_classes: the records carry no class distribution; pass num_classes")


def prediction_metrics(
    records: Sequence, num_classes: int | None = None, *, which: str = "fused", candidate: int = 0
) -> dict:
    """Metrics of the records' ``fused`` predictions (or of candidate ``candidate``'s: ``which="candidate"``)."""
    if not records:
        raise ValueError("records: expected at least one prediction record, got 0")
    if which not in ("fused", "candidate"):
        raise ValueError(f"which: expected 'fused' or 'candidate', got {which!r}")
    seen: set = set()
    for r in records:
        if r.query_id in seen:
            raise ValueError(f"records: query id {r.query_id!r} appears more than once (one record per query)")
        seen.add(r.query_id)
    kinds = {r.kind for r in records}
    if len(kinds) != 1:
        raise ValueError(f"records: expected one task kind, got {sorted(kinds)}")
    kind = kinds.pop()
    preds = [r.fused if which == "fused" else r.candidates[candidate].prediction for r in records]
    golds = [r.gold for r in records]
    out: dict = {"n": len(records)}
    if kind == "vqa_open":
        out["exact_match"] = exact_match([str(p) for p in preds], [str(g) for g in golds])
        out.update(open_token_scores([str(p) for p in preds], [str(g) for g in golds]))
        return out
    C = num_classes if num_classes is not None else _num_classes(records)
    if kind == "multilabel":
        out["subset_accuracy"] = subset_accuracy(preds, golds)
        out["macro_f1"] = multilabel_macro_f1(preds, golds, C)
    else:
        out["accuracy"] = accuracy(preds, golds)
        out["macro_f1"] = macro_f1(preds, golds, C)
    return out
