"""Inference (``jomed_fast.infer``): retrieve the top-k of each head, score every candidate with the
reader, fuse (``fusion``: the paper's rule or the reference code's), decide, write JSONL (``predict``)."""

from .fusion import FUSIONS, decide, fuse, head_normalized_scores
from .predict import RETRIEVAL_MODES, InferConfig, predict, read_predictions

__all__ = ["FUSIONS", "RETRIEVAL_MODES", "InferConfig", "decide", "fuse", "head_normalized_scores", "predict",
           "read_predictions"]
