"""Inference (``jomed_fast.infer``): retrieve the top-k of each head, score every candidate with the
reader, fuse (``fusion``: the paper's rule or the reference code's), decide, write JSONL (``predict``)."""

from .fusion import FUSIONS, decide, fuse, head_normalized_scores
from .open_vqa import OpenAnswerer, fuse_open_answers, generate_answers
from .predict import RETRIEVAL_MODES, InferConfig, predict, read_predictions

__all__ = ["FUSIONS", "RETRIEVAL_MODES", "InferConfig", "OpenAnswerer", "decide", "fuse", "fuse_open_answers", "generate_answers", "head_normalized_scores", "predict",
           "read_predictions"]
