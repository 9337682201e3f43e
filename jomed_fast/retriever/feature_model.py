r"""A transformers model with a tokenizer and an image processor, read through its own feature
functions: what the Hugging Face (CLIP, SigLIP) and remote-code (jina-clip-v1) adapters share.

``encode_images`` -> :math:`\mathrm{norm}(\texttt{get\_image\_features}(x))` and ``encode_texts``
-> :math:`\mathrm{norm}(\texttt{get\_text\_features}(t))`, ``[N, D]``: the model's embeddings, not
a re-implementation of its towers. ``save`` writes ``save_pretrained``'s files of the model, the
tokenizer and the image processor into one directory, atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._files import replace_dir_atomically
from .interface import Retriever, check_texts, pil_images

__all__ = ["FeatureModelEncoder", "features"]


def features(out: Any) -> torch.Tensor:
    """A ``get_*_features`` result as ``[N, D]``: transformers 5 returns a model output whose
    ``pooler_output`` is projected; remote-code models (jina-clip) return the tensor itself."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if not isinstance(pooled, torch.Tensor):
        raise TypeError(f"features: expected a tensor or an output with pooler_output, got {type(out).__name__}")
    return pooled


class FeatureModelEncoder(Retriever):
    """Subclasses set ``model``, ``tokenizer``, ``processor`` and ``_blocks`` (the image tower's
    block list) and say how texts are tokenized (:meth:`_tokenize`, padding to the longest by
    default)."""

    model: Any
    tokenizer: Any
    processor: Any
    _blocks: nn.ModuleList | nn.Sequential

    def image_layers(self) -> list[nn.Module]:
        return list(self._blocks)

    def config_dict(self) -> dict:
        return self.model.config.to_dict()

    def encode_images(self, images) -> torch.Tensor:
        if isinstance(images, torch.Tensor):  # already pixel_values [N, 3, H, W]
            pv = images
        else:
            pv = self.processor(images=pil_images(images), return_tensors="pt")["pixel_values"]
        return F.normalize(features(self.model.get_image_features(pixel_values=pv.to(self.device()))), dim=-1)

    def _tokenize(self, texts: list[str]) -> dict:
        return self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        tok = self._tokenize(check_texts(texts))
        tok = {k: v.to(self.device()) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
        return F.normalize(features(self.model.get_text_features(**tok)), dim=-1)

    def save(self, out_dir) -> Path:
        def fill(tmp: Path) -> None:
            for part in (self.model, self.tokenizer, self.processor):
                part.save_pretrained(tmp)

        # through a temporary directory: atomic, and save_pretrained's 0600 weights get the umask's mode
        return replace_dir_atomically(out_dir, fill)
