"""Analyses over stored per-query prediction records (``jomed_fast.analysis``); no model needed."""

from .consistency import (
    PAPER_RERANKERS,
    check_same_queries,
    is_inconsistent,
    oracle_accuracy,
    oracle_correct,
    rerank_accuracy,
    rerank_fusion,
    rerank_top_confidence,
    rerank_top_retrieval,
    split_consistency,
    split_metrics,
    write_analysis,
    write_consistency_tables,
)
from .prediction_records import Candidate, PredictionRecord, read_jsonl, write_jsonl
from .robustness import metrics_table, uniform_random_records

__all__ = [
    "PAPER_RERANKERS",
    "Candidate",
    "PredictionRecord",
    "check_same_queries",
    "is_inconsistent",
    "metrics_table",
    "oracle_accuracy",
    "oracle_correct",
    "read_jsonl",
    "rerank_accuracy",
    "rerank_fusion",
    "rerank_top_confidence",
    "rerank_top_retrieval",
    "split_consistency",
    "split_metrics",
    "uniform_random_records",
    "write_analysis",
    "write_consistency_tables",
    "write_jsonl",
]
