"""Training: stage 1 (reader, ``train.reader``) and stage 2 (retriever, ``train.retriever``).

Shared pieces, one job each: ``checkpoint`` (exact-resume checkpoints, no pickle), ``schedule``
(warm-up + cosine learning rate), ``guards`` (a non-finite loss stops the run).
"""

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_named
from .guards import NonFiniteLossError, check_finite
from .schedule import WarmupCosine, warmup_cosine

__all__ = [
           "NonFiniteLossError",
           "WarmupCosine",
           "check_finite",
           "latest_checkpoint",
           "load_checkpoint",
           "save_checkpoint",
           "save_named",
           "warmup_cosine",
]
