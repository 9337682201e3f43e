"""Metric functions. Inputs are plain Python sequences; errors name the argument."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from jomed_fast._checks import is_int
from jomed_fast.tasks.spec import normalize_open_answer


def _check_lengths(preds: Sequence, targets: Sequence) -> None:
    if len(preds) != len(targets):
        raise ValueError(f"preds and targets must have the same length, got preds={len(preds)} targets={len(targets)}")


def _check_labels(name: str, values: Iterable[int], num_classes: int) -> None:
    for v in values:
        if not (is_int(v) or isinstance(v, np.integer)) or not 0 <= int(v) < num_classes:
            raise ValueError(f"{name}: expected class indices in 0..{num_classes - 1}, got {v!r}")


def accuracy(preds: Sequence[int], targets: Sequence[int]) -> float:
    _check_lengths(preds, targets)
    if len(targets) == 0:
        raise ValueError("targets: expected at least one example, got 0")
    return float(np.mean([int(p) == int(t) for p, t in zip(preds, targets)]))


def _f1_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def macro_f1(preds: Sequence[int], targets: Sequence[int], num_classes: int) -> float:
    """Unweighted mean of per-class F1 over all ``num_classes`` classes (absent classes score 0)."""
    _check_lengths(preds, targets)
    _check_labels("preds", preds, num_classes)
    _check_labels("targets", targets, num_classes)
    p = np.asarray(preds, dtype=int)
    t = np.asarray(targets, dtype=int)
    c = np.arange(num_classes)[:, None]
    tp = ((p == c) & (t == c)).sum(1)
    fp = ((p == c) & (t != c)).sum(1)
    fn = ((p != c) & (t == c)).sum(1)
    return float(_f1_from_counts(tp, fp, fn).mean())


def _indicator(name: str, sets: Sequence[Iterable[int]], num_classes: int) -> np.ndarray:
    m = np.zeros((len(sets), num_classes), dtype=bool)
    for i, s in enumerate(sets):
        s = list(s)
        _check_labels(name, s, num_classes)
        m[i, s] = True
    return m


def multilabel_macro_f1(preds: Sequence[Iterable[int]], targets: Sequence[Iterable[int]], num_classes: int) -> float:
    """Per-label F1 (indicator columns) averaged over labels; sklearn's macro on indicator matrices."""
    _check_lengths(preds, targets)
    p = _indicator("preds", preds, num_classes)
    t = _indicator("targets", targets, num_classes)
    tp, fp, fn = (p & t).sum(0), (p & ~t).sum(0), (~p & t).sum(0)
    return float(_f1_from_counts(tp, fp, fn).mean())


def subset_accuracy(preds: Sequence[Iterable[int]], targets: Sequence[Iterable[int]]) -> float:
    _check_lengths(preds, targets)
    if len(targets) == 0:
        raise ValueError("targets: expected at least one example, got 0")
    return float(np.mean([frozenset(p) == frozenset(t) for p, t in zip(preds, targets)]))


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and articles, collapse whitespace (the
    task layer's :func:`jomed_fast.tasks.normalize_open_answer`, one rule for the whole package)."""
    return normalize_open_answer(text)


def exact_match(preds: Sequence[str], targets: Sequence[str]) -> float:
    _check_lengths(preds, targets)
    if len(targets) == 0:
        raise ValueError("targets: expected at least one example, got 0")
    return float(np.mean([normalize_answer(p) == normalize_answer(t) for p, t in zip(preds, targets)]))


def token_prf(pred: str, target: str) -> tuple[float, float, float]:
    """SQuAD token precision, recall, F1 of one answer (both empty -> 1, one empty -> 0)."""
    pt, tt = normalize_answer(pred).split(), normalize_answer(target).split()
    if not pt or not tt:
        v = float(pt == tt)
        return v, v, v
    common = sum((Counter(pt) & Counter(tt)).values())
    if common == 0:
        return 0.0, 0.0, 0.0
    p, r = common / len(pt), common / len(tt)
    return p, r, 2 * p * r / (p + r)


def open_token_scores(preds: Sequence[str], targets: Sequence[str]) -> dict[str, float]:
    """Mean token precision / recall / F1 over examples."""
    _check_lengths(preds, targets)
    if len(targets) == 0:
        raise ValueError("targets: expected at least one example, got 0")
    s = np.array([token_prf(p, t) for p, t in zip(preds, targets)])
    return {"precision": float(s[:, 0].mean()), "recall": float(s[:, 1].mean()), "f1": float(s[:, 2].mean())}
