"""Analyses over stored per-query prediction records (``jomed_fast.analysis``); no model needed.

``consistency`` (the inconsistent / consistent split, oracle, writing tables), ``rerankers``
(Table 8: one candidate picked vs fusion, per split) and ``rerank_tables`` (writing it),
``lvlm_rerank`` (an LVLM picks the candidate: the paper's o3 study), ``head_top1`` (the top-1
candidate of each retrieval head, the one definition ``evaluate`` and ``analyze`` share),
``robustness`` (Table 7), ``baselines`` (retrieval-only votes: kNN over the base retriever's
records, each system's own candidates), ``significance`` (paired McNemar and bootstrap of the
differences between systems), ``per_class`` (F1 per class), ``calibration`` (reliability of the fused
probabilities), ``figures`` (the charts, drawn without pyplot), ``prediction_records`` (the format).
"""

from .baselines import candidate_vote_records, index_labels, knn_vote_records, retrieval_baselines, vote
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
from .significance import compare_paired, paired_bootstrap, significance_table, write_significance

__all__ = [
    "PAPER_RERANKERS",
    "Candidate",
    "PredictionRecord",
    "candidate_vote_records",
    "check_same_queries",
    "compare_paired",
    "head_top1",
    "head_top1_metrics",
    "inconsistency_shares",
    "index_labels",
    "is_inconsistent",
    "knn_vote_records",
    "metrics_table",
    "oracle_accuracy",
    "oracle_correct",
    "oracle_f1",
    "oracle_pick",
    "paired_bootstrap",
    "per_class_f1",
    "read_jsonl",
    "reliability",
    "pick_correct",
    "rerank_table",
    "rerank_top_confidence",
    "rerank_top_retrieval",
    "rerank_top_retrieval_in_head",
    "rerankers_for",
    "retrieval_baselines",
    "significance_table",
    "split_consistency",
    "split_metrics",
    "uniform_random_records",
    "vote",
    "write_analysis",
    "write_calibration",
    "write_consistency_tables",
    "write_jsonl",
    "wilson_interval",
    "write_per_class_f1",
    "write_rerank_tables",
    "write_significance",
]
