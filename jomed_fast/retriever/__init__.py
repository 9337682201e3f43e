"""Dual-head retriever: tiny in-code CLIP encoder (+ contrastive pre-training) and query encoder."""
from .tiny import TinyCLIP, TinyConfig, clip_loss, pretrain, recall_at_k, images_to_tensor
from .dual import Candidates, QueryEncoder, merge_heads
from .loading import load_encoder, save_encoder
from .heads import HeadEncoders, load_head_encoders

__all__ = ["TinyCLIP", "TinyConfig", "clip_loss", "pretrain", "recall_at_k", "images_to_tensor",
           "Candidates", "QueryEncoder", "merge_heads", "load_encoder", "save_encoder", "HeadEncoders",
           "load_head_encoders"]
