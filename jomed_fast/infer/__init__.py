"""Inference (``jomed_fast.infer``): retrieve the top-k of each head, score every candidate with the
reader, fuse (``fusion``: the paper's rule or the reference code's; open VQA: ``open_vqa``), decide,
write JSONL (``predict``) into a predictions file that resumes only from the same inputs and never
loses what it holds (``output``)."""

from .fusion import FUSIONS, decide, fuse, head_normalized_scores
from .open_vqa import (
    OPEN_FUSIONS,
    OpenAnswerer,
    answer_log_likelihoods,
    fuse_open_answers,
    generate_answer_tokens,
    generate_answers,
    paper_open_answer,
)
from .output import PredictionsFile, check_output_free, read_predictions, refuse_inputs_as_outputs
from .predict import (
    RETRIEVAL_ALIASES,
    RETRIEVAL_MODES,
    InferConfig,
    check_inputs,
    encoder_fingerprint,
    predict,
    predict_identity,
    random_queries,
    result_options,
)

__all__ = [
    "FUSIONS",
    "OPEN_FUSIONS",
    "RETRIEVAL_ALIASES",
    "RETRIEVAL_MODES",
    "InferConfig",
    "OpenAnswerer",
    "PredictionsFile",
    "check_inputs",
    "check_output_free",
    "decide",
    "encoder_fingerprint",
    "fuse",
    "answer_log_likelihoods",
    "fuse_open_answers",
    "generate_answer_tokens",
    "generate_answers",
    "paper_open_answer",
    "head_normalized_scores",
    "predict",
    "predict_identity",
    "random_queries",
    "read_predictions",
    "refuse_inputs_as_outputs",
    "result_options",
]
