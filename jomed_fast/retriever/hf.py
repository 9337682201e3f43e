r"""CLIP-style dual encoder loaded from a local directory through transformers (offline).

``encode_images`` -> :math:`\mathrm{norm}(W_v\, \mathrm{ViT}(x))` ``[N, D]``; ``encode_texts`` ->
:math:`\mathrm{norm}(W_t\, \mathrm{Text}(t))` ``[N, D]``. Images are preprocessed with
``CLIPImageProcessorPil`` (PIL + numpy; the default ``CLIPImageProcessor`` may need torchvision).
jina-clip (custom code) loads only with ``trust_remote_code=True`` passed by the caller.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F


class HFCLIPEncoder(torch.nn.Module):
    def __init__(self, path, trust_remote_code: bool = False, device: str = "cpu"):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer, CLIPImageProcessorPil

        p = Path(path)
        if not (p / "config.json").is_file():
            raise ValueError(f"path: {p / 'config.json'} not found (expected a local CLIP model directory)")
        self.path = p
        self.model = (
            AutoModel.from_pretrained(str(p), local_files_only=True, trust_remote_code=trust_remote_code)
            .to(device)
            .eval()
        )
        self.tokenizer = AutoTokenizer.from_pretrained(
            str(p), local_files_only=True, trust_remote_code=trust_remote_code
        )
        self.processor = CLIPImageProcessorPil.from_pretrained(str(p), local_files_only=True)

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    def image_layers(self):
        return list(self.model.vision_model.encoder.layers)

    def image_head_modules(self):
        return [self.model.vision_model.post_layernorm, self.model.visual_projection]

    def _dev(self):
        return next(self.model.parameters()).device

    def encode_images(self, images) -> torch.Tensor:
        if isinstance(images, torch.Tensor):  # already pixel_values [N, 3, H, W]
            pv = images
        else:
            from ..prompts import as_image  # uint8, float in [0, 1] and any PIL mode alike

            pil = [as_image(a, name=f"images[{i}]") for i, a in enumerate(images)]
            pv = self.processor(images=pil, return_tensors="pt")["pixel_values"]
        out = self.model.vision_model(pixel_values=pv.to(self._dev()))
        return F.normalize(self.model.visual_projection(out.pooler_output), dim=-1)

    def encode_texts(self, texts) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("texts: expected a sequence of strings, got a single str")
        tok = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self._dev())
        out = self.model.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        return F.normalize(self.model.text_projection(out.pooler_output), dim=-1)

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(self.model.config.to_dict(), sort_keys=True, default=str).encode())
        for k, v in sorted(self.model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().float().numpy().tobytes())
        return h.hexdigest()
