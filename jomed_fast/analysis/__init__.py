"""Analyses over stored per-query prediction records (``jomed_fast.analysis``); no model needed.

``consistency`` (the inconsistent / consistent split, oracle, writing tables), ``rerankers``
(Table 8: one candidate picked vs fusion, per split) and ``rerank_tables`` (writing it),
``lvlm_rerank`` (an LVLM picks the candidate: the paper's o3 study), ``head_top1`` (the top-1
candidate of each retrieval head, the one definition ``evaluate`` and ``analyze`` share),
``robustness`` (Table 7), ``per_class`` (F1 per class), ``calibration`` (reliability of the fused
probabilities), ``figures`` (the charts, drawn without pyplot), ``prediction_records`` (the format).
"""

from .calibration import reliability, write_calibration
from .consistency import (
    check_same_queries,
    inconsistency_shares,
    is_inconsistent,
    oracle_accuracy,
    oracle_correct,
    oracle_f1,
    oracle_pick,
    split_consistency,
    split_metrics,
    write_analysis,
    write_consistency_tables,
)
from .head_top1 import head_top1, head_top1_metrics
from .per_class import per_class_f1, write_per_class_f1
from .prediction_records import Candidate, PredictionRecord, read_jsonl, write_jsonl
from .rerank_tables import write_rerank_tables
from .rerankers import (
    PAPER_RERANKERS,
    pick_correct,
    rerank_table,
    rerank_top_confidence,
    rerank_top_retrieval,
    rerank_top_retrieval_in_head,
    rerankers_for,
    wilson_interval,
)
from .robustness import metrics_table, uniform_random_records

__all__ = [
    "PAPER_RERANKERS",
    "Candidate",
    "PredictionRecord",
    "check_same_queries",
    "head_top1",
    "head_top1_metrics",
    "inconsistency_shares",
    "is_inconsistent",
    "metrics_table",
    "oracle_accuracy",
    "oracle_correct",
    "oracle_f1",
    "oracle_pick",
    "per_class_f1",
    "read_jsonl",
    "reliability",
    "pick_correct",
    "rerank_table",
    "rerank_top_confidence",
    "rerank_top_retrieval",
    "rerank_top_retrieval_in_head",
    "rerankers_for",
    "split_consistency",
    "split_metrics",
    "uniform_random_records",
    "write_analysis",
    "write_calibration",
    "write_consistency_tables",
    "write_jsonl",
    "wilson_interval",
    "write_per_class_f1",
    "write_rerank_tables",
]
