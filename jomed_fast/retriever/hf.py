r"""Hugging Face ``CLIPModel`` / ``SiglipModel`` as a retriever, loaded from a local directory (offline).

``encode_images`` -> :math:`\mathrm{norm}(\texttt{get\_image\_features}(x))` ``[N, D]``;
``encode_texts`` -> :math:`\mathrm{norm}(\texttt{get\_text\_features}(t))` ``[N, D]``: the model's own
feature functions, so the embeddings are the library's. Images go through the ``*ImageProcessorPil``
class of the family (PIL + numpy; the default fast processors need torchvision). SigLIP's texts are
padded to its ``max_position_embeddings``, as it was trained (it pools the last position).

Trainable set for stage 2: the last vision ``encoder.layers`` plus what follows them
(``post_layernorm``, SigLIP's attention-pooling ``head``) and CLIP's ``visual_projection``.
``save`` writes ``save_pretrained``'s files (model, tokenizer, image processor).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .blocks import find_blocks, modules_after
from .feature_model import FeatureModelEncoder
from .model_dir import read_config

__all__ = ["HFCLIPEncoder", "HF_FAMILIES"]

# config.json's model_type -> (model class, PIL image processor class), names in transformers
HF_FAMILIES = {
    "clip": ("CLIPModel", "CLIPImageProcessorPil"),
    "siglip": ("SiglipModel", "SiglipImageProcessorPil"),
}


class HFCLIPEncoder(FeatureModelEncoder):
    """A CLIP or SigLIP checkpoint directory (``config.json`` with ``model_type`` clip / siglip)."""

    def __init__(self, path, trust_remote_code: bool = False, device: str = "cpu"):
        super().__init__()
        import transformers

        p = Path(path)
        model_type = read_config(p).get("model_type")
        if model_type not in HF_FAMILIES:
            raise ValueError(
                f"path: {p / 'config.json'} has model_type {model_type!r}, expected one of {', '.join(HF_FAMILIES)}"
            )
        model_class, processor_class = (getattr(transformers, n) for n in HF_FAMILIES[model_type])
        self.path = p
        self.family = model_type
        self.model = model_class.from_pretrained(str(p), local_files_only=True).to(device).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(p), local_files_only=True, trust_remote_code=trust_remote_code
        )
        self.processor = processor_class.from_pretrained(str(p), local_files_only=True)
        self._blocks_path, self._blocks = find_blocks(self.model.vision_model, "vision_model")

    @property
    def dim(self) -> int:
        if self.family == "clip":
            return int(self.model.config.projection_dim)
        return int(self.model.config.vision_config.hidden_size)

    def image_head_modules(self) -> list[nn.Module | nn.Parameter]:
        after: list[nn.Module | nn.Parameter] = list(modules_after(self.model.vision_model, self._blocks_path))
        projection = getattr(self.model, "visual_projection", None)
        return after + ([projection] if projection is not None else [])

    def text_layers(self) -> list[nn.Module]:
        return list(find_blocks(self.model.text_model, "text_model")[1])

    def _tokenize(self, texts: list[str]) -> dict:
        if self.family == "siglip":  # trained on max-length padding: it pools the last position
            length = int(self.model.config.text_config.max_position_embeddings)
            return self.tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
