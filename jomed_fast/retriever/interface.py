r"""The retriever interface every encoder family implements (``Retriever``).

A retriever maps images and texts into one joint space, L2-normalised:

.. math:: e_I = f_I(x) / \lVert f_I(x) \rVert_2,\quad e_T = f_T(t) / \lVert f_T(t) \rVert_2
          \in \mathbb{R}^{N \times D}

Stage 2 trains the image tower's last blocks (``image_layers()[-n:]``) with what follows them to
the joint space (``image_head_modules()``: the final norm and projection), everything else frozen
(``retriever.dual.QueryEncoder``). ``save`` writes the base model's own format, so the library
that made the model loads the trained weights without jomed_fast.
"""

from __future__ import annotations

import abc
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..prompts import as_image

__all__ = ["Retriever", "weights_fingerprint", "pil_images", "check_texts"]


class Retriever(nn.Module, abc.ABC):
    """One dual encoder: ``encode_images`` / ``encode_texts`` -> ``[N, D]``, unit rows."""

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """D, the joint space's width."""

    @abc.abstractmethod
    def encode_images(self, images) -> torch.Tensor:
        """``[N, D]`` from N images (arrays or PIL images) or the family's pixel tensor ``[N, 3, H, W]``."""

    @abc.abstractmethod
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """``[N, D]`` from N strings."""

    @abc.abstractmethod
    def image_layers(self) -> list[nn.Module]:
        """The image tower's transformer blocks, input to output (stage 2 unfreezes the last ones)."""

    @abc.abstractmethod
    def image_head_modules(self) -> list[nn.Module | nn.Parameter]:
        """What maps the last block's output to the joint space (trained with the last blocks)."""

    @abc.abstractmethod
    def text_layers(self) -> list[nn.Module]:
        """The text tower's transformer blocks, input to output."""

    @abc.abstractmethod
    def config_dict(self) -> dict:
        """The architecture, as the base library describes it (part of the fingerprint)."""

    @abc.abstractmethod
    def save(self, out_dir) -> Path:
        """Write the model in its library's own format (plus tokenizer and image processing), atomically."""

    def fingerprint(self) -> str:
        """sha256 of the architecture and every weight: what an index or cache built with it depends on."""
        return weights_fingerprint(self.config_dict(), self.state_dict())

    def device(self) -> torch.device:
        return next(self.parameters()).device


def _architecture(config: Any) -> Any:
    """``config`` without the keys a library adds about where it was read from (``_name_or_path``,
    ``_commit_hash``) and which release wrote it: paths and versions are not identity."""
    if isinstance(config, dict):
        return {
            k: _architecture(v) for k, v in config.items() if not str(k).startswith("_") and k != "transformers_version"
        }
    return config


def weights_fingerprint(config: dict, state: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(_architecture(config), sort_keys=True, default=str).encode())
    for k, v in sorted(state.items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def pil_images(images) -> list:
    """PIL RGB images from arrays (uint8, float in [0, 1]) or PIL images of any mode."""
    return [as_image(a, name=f"images[{i}]") for i, a in enumerate(images)]


def check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts: expected a sequence of strings, got a single str")
    return list(texts)
