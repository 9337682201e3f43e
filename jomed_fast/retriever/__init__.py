"""Dual-head retriever: the ``Retriever`` interface and its adapters, the tiny in-code CLIP encoder
(+ contrastive pre-training) and the stage-2 query encoders."""

from .dual import Candidates, QueryEncoder, merge_heads
from .encoder_io import load_encoder, save_encoder
from .head_encoders import HeadEncoders, load_head_encoders
from .interface import Retriever
from .tiny_clip import TinyCLIP, TinyConfig, clip_loss, images_to_tensor, pretrain, recall_at_k

__all__ = [
    "Retriever",
    "TinyCLIP",
    "TinyConfig",
    "clip_loss",
    "pretrain",
    "recall_at_k",
    "images_to_tensor",
    "Candidates",
    "QueryEncoder",
    "merge_heads",
    "load_encoder",
    "save_encoder",
    "HeadEncoders",
    "load_head_encoders",
]
