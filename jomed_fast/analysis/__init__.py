"""Analyses over stored per-query prediction records (``jomed_fast.analysis``); no model needed."""
from .records import Candidate, PredictionRecord, read_jsonl, write_jsonl
from .core import (is_inconsistent, split_consistency, split_metrics, oracle_correct, oracle_accuracy,
                   rerank_top_retrieval, rerank_top_confidence, rerank_fusion, rerank_accuracy,
                   write_analysis)
from .robustness import metrics_table, uniform_random_records

__all__ = ["Candidate", "PredictionRecord", "read_jsonl", "write_jsonl", "is_inconsistent",
           "split_consistency", "split_metrics", "oracle_correct", "oracle_accuracy",
           "rerank_top_retrieval", "rerank_top_confidence", "rerank_fusion", "rerank_accuracy",
           "write_analysis", "metrics_table", "uniform_random_records"]
