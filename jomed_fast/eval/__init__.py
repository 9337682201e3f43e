"""Metrics (``jomed_fast.eval``): accuracy, macro-F1, multilabel, exact match, SQuAD token F1.

Macro-F1 convention (matches ``sklearn.metrics.f1_score(average='macro', labels=range(C),
zero_division=0)``): every class of the task's label set counts, a class with no support and no
predictions scores F1 = 0.
"""

from .metrics import (
    accuracy,
    exact_match,
    macro_f1,
    multilabel_macro_f1,
    normalize_answer,
    open_token_scores,
    subset_accuracy,
    token_prf,
)
from .predictions import prediction_metrics

__all__ = [
    "accuracy",
    "macro_f1",
    "multilabel_macro_f1",
    "subset_accuracy",
    "exact_match",
    "token_prf",
    "open_token_scores",
    "normalize_answer",
    "prediction_metrics",
]
