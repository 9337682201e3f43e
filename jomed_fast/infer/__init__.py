"""Inference (``jomed_fast.infer``): retrieve the top-k of each head, score every candidate with the
reader, fuse (``fusion``: the paper's rule or the reference code's), decide, write JSONL (``predict``)
into a predictions file that resumes only from the same inputs and never loses what it holds (``output``)."""

from .fusion import FUSIONS, decide, fuse, head_normalized_scores
from .open_vqa import OpenAnswerer, fuse_open_answers, generate_answers
from .output import PredictionsFile, check_output_free, read_predictions, refuse_inputs_as_outputs
from .predict import (
    RETRIEVAL_MODES,
    InferConfig,
    check_inputs,
    encoder_fingerprint,
    predict,
    predict_identity,
    result_options,
)

__all__ = [
    "FUSIONS",
    "RETRIEVAL_MODES",
    "InferConfig",
    "OpenAnswerer",
    "PredictionsFile",
    "check_inputs",
    "check_output_free",
    "decide",
    "encoder_fingerprint",
    "fuse",
    "fuse_open_answers",
    "generate_answers",
    "head_normalized_scores",
    "predict",
    "predict_identity",
    "read_predictions",
    "refuse_inputs_as_outputs",
    "result_options",
]
