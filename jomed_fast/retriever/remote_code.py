r"""A model with its own code (``trust_remote_code``) that exposes ``get_image_features`` /
``get_text_features``, as jina-clip-v1 does, as a retriever.

``encode_images`` -> :math:`\mathrm{norm}(\texttt{get\_image\_features}(x))`,
``encode_texts`` -> :math:`\mathrm{norm}(\texttt{get\_text\_features}(t))`, ``[N, D]``. Such code calls
its towers its own way (jina-clip's EVA tower is ``vision_model(x=...)`` and returns a tensor), so
only the two feature functions are called, and the blocks to train are found in the module tree
(``blocks.find_blocks``: EVA's ``.blocks``, a BERT text tower's ``encoder.layer``).

The towers are the model's first attribute present of ``IMAGE_TOWERS`` / ``TEXT_TOWERS``. Stage 2
trains the image tower's last blocks, the modules after them (EVA's ``norm`` / ``head``) and the
model's ``visual_projection`` where it has one. ``save`` is ``save_pretrained``, which copies the
model's code beside its weights: ``AutoModel.from_pretrained(dir, trust_remote_code=True)`` reads it.
The code runs only when the caller passes ``trust_remote_code=True``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .blocks import find_blocks, modules_after
from .feature_model import FeatureModelEncoder

__all__ = ["RemoteCodeEncoder", "IMAGE_TOWERS", "TEXT_TOWERS"]

IMAGE_TOWERS = ("vision_model", "visual", "vision_tower", "image_encoder")
TEXT_TOWERS = ("text_model", "text", "text_tower", "text_encoder")


def _tower(model: nn.Module, names: tuple[str, ...], what: str) -> tuple[str, nn.Module]:
    for name in names:
        tower = getattr(model, name, None)
        if isinstance(tower, nn.Module):
            return name, tower
    raise ValueError(
        f"model: expected the {what} tower as one of {', '.join(names)} on {type(model).__name__}, found none"
    )


class RemoteCodeEncoder(FeatureModelEncoder):
    """A local directory whose ``config.json`` maps ``AutoModel`` to the model's own code."""

    def __init__(self, path, trust_remote_code: bool = False, device: str = "cpu"):
        super().__init__()
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        p = Path(path)
        if not trust_remote_code:
            raise ValueError(
                f"trust_remote_code: {p} runs its own model code (config.json auto_map); expected "
                "trust_remote_code=True (--trust-remote-code) to allow it, got False"
            )
        self.path = p
        self.model = AutoModel.from_pretrained(str(p), local_files_only=True, trust_remote_code=True).to(device).eval()
        for method in ("get_image_features", "get_text_features"):
            if not callable(getattr(self.model, method, None)):
                raise ValueError(f"path: the model in {p} ({type(self.model).__name__}) has no {method}")
        self.tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=True)
        self.processor = AutoImageProcessor.from_pretrained(str(p), local_files_only=True, trust_remote_code=True)
        self._image_name, self._image_tower = _tower(self.model, IMAGE_TOWERS, "image")
        self._blocks_path, self._blocks = find_blocks(self._image_tower, self._image_name)

    @property
    def dim(self) -> int:
        width = getattr(self.model.config, "projection_dim", None)
        if isinstance(width, int):
            return width
        with torch.no_grad():  # code whose config names no width: the width of what it returns
            return int(self.encode_texts([""]).shape[-1])

    def image_head_modules(self) -> list[nn.Module | nn.Parameter]:
        after: list[nn.Module | nn.Parameter] = list(modules_after(self._image_tower, self._blocks_path))
        projection = getattr(self.model, "visual_projection", None)
        return after + ([projection] if isinstance(projection, nn.Module) else [])

    def text_layers(self) -> list[nn.Module]:
        name, tower = _tower(self.model, TEXT_TOWERS, "text")
        return list(find_blocks(tower, name)[1])
