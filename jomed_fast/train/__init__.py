"""Training: stage 1 (reader, ``train.reader``) and stage 2 (retriever, ``train.retriever``;
``train.retriever_heads`` both heads in turn).

Both run one loop (``loop``: the run directory and its identity, the step / evaluate / select /
checkpoint cycle, exact resume); each stage supplies its loss, its batch and its evaluation.
Shared pieces, one job each: ``checkpoint`` (exact-resume checkpoints, no pickle), ``schedule``
(warm-up + cosine learning rate), ``guards`` (a non-finite loss stops the run), ``data_order``
(the order of epoch e as a pure function of the seed and e), ``_config`` (options: JSON round
trip and checks), ``score_cache`` (stage 2's exact reader-score cache, keyed by content).
"""

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_named
from .guards import NonFiniteLossError, check_finite
from .reader import ReaderTrainConfig, ReaderTrainResult, train_reader
from .retriever import RetrieverTrainConfig, RetrieverTrainResult, train_retriever
from .retriever_heads import train_retriever_heads
from .run_log import read_log
from .schedule import WarmupCosine, warmup_cosine
from .score_cache import ScoreCache

__all__ = [
    "NonFiniteLossError",
    "ReaderTrainConfig",
    "ReaderTrainResult",
    "RetrieverTrainConfig",
    "RetrieverTrainResult",
    "ScoreCache",
    "WarmupCosine",
    "check_finite",
    "latest_checkpoint",
    "read_log",
    "load_checkpoint",
    "save_checkpoint",
    "save_named",
    "train_reader",
    "train_retriever",
    "train_retriever_heads",
    "warmup_cosine",
]
