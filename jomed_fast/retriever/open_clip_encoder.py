r"""An open_clip model (BiomedCLIP, EVA-CLIP, open_clip's own ViTs) as a retriever, from a local
directory in open_clip's hub layout: ``open_clip_config.json`` (``model_cfg``, ``preprocess_cfg``)
and the weights (``open_clip_model.safetensors``; BiomedCLIP ships ``open_clip_pytorch_model.bin``).

``encode_images`` -> :math:`\mathrm{norm}(\texttt{encode\_image}(x))`, ``encode_texts`` ->
:math:`\mathrm{norm}(\texttt{encode\_text}(\mathrm{tokenize}(t)))`, ``[N, D]``, with open_clip's own
image transform and tokenizer for the directory. The image blocks are found in ``model.visual``
(timm trunks' ``trunk.blocks``: BiomedCLIP's ViT, EVA; open_clip's ``transformer.resblocks``);
stage 2 trains the last ones with the modules after them (the trunk's ``norm`` / ``fc_norm`` /
``head``, the adapter's ``head``; ``ln_post``) and open_clip's ``visual.proj`` matrix.
``save`` writes the same layout, which ``open_clip.create_model("local-dir:<dir>")`` reads.

A Hugging Face text tower (BiomedCLIP's PubMedBERT) is built from ``text_cfg.hf_model_name``: a
local directory, or a hub name already in the local cache (loading is offline).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from .._files import replace_dir_atomically
from .blocks import find_blocks, modules_after
from .interface import Retriever, check_texts, pil_images
from .model_dir import OPEN_CLIP_CONFIG, read_config

__all__ = ["OpenCLIPEncoder", "OPEN_CLIP_WEIGHTS"]

OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"


class OpenCLIPEncoder(Retriever):
    """An open_clip hub-layout directory (see the module docstring)."""

    def __init__(self, path, device: str = "cpu"):
        super().__init__()
        # an optional dependency, installed apart from the package (docs/install.md)
        open_clip = importlib.import_module("open_clip")

        p = Path(path)
        self.path = p
        self._config = read_config(p, OPEN_CLIP_CONFIG)
        if "model_cfg" not in self._config:
            raise ValueError(
                f"path: {p / OPEN_CLIP_CONFIG} expected a model_cfg entry, got keys {sorted(self._config)}"
            )
        # the directory's weights replace every tower's: nothing pretrained is fetched
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            f"local-dir:{p}", device=device, pretrained_image=False, pretrained_text=False, require_pretrained=True
        )
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(f"local-dir:{p}")
        self._blocks_path, self._blocks = find_blocks(self.model.visual, "visual")

    @property
    def dim(self) -> int:
        return int(self._config["model_cfg"]["embed_dim"])

    def image_layers(self) -> list[nn.Module]:
        return list(self._blocks)

    def image_head_modules(self) -> list[nn.Module | nn.Parameter]:
        after: list[nn.Module | nn.Parameter] = list(modules_after(self.model.visual, self._blocks_path))
        proj = getattr(self.model.visual, "proj", None)  # open_clip's own ViT: a bare matrix
        return after + ([proj] if isinstance(proj, nn.Parameter) else [])

    def text_layers(self) -> list[nn.Module]:
        text = getattr(self.model, "text", None)  # custom text towers; else the CLIP class's own
        return list(find_blocks(text if isinstance(text, nn.Module) else self.model.transformer, "text")[1])

    def config_dict(self) -> dict:
        return self._config

    def encode_images(self, images) -> torch.Tensor:
        if isinstance(images, torch.Tensor):  # already transformed [N, 3, H, W]
            x = images
        else:
            x = torch.stack([self.preprocess(im) for im in pil_images(images)])
        return F.normalize(self.model.encode_image(x.to(self.device())), dim=-1)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(check_texts(texts)).to(self.device())
        return F.normalize(self.model.encode_text(tokens), dim=-1)

    def save(self, out_dir) -> Path:
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}

        def fill(tmp: Path) -> None:
            (tmp / OPEN_CLIP_CONFIG).write_text(json.dumps(self._config, indent=2) + "\n")
            save_file(state, str(tmp / OPEN_CLIP_WEIGHTS))
            # a Hugging Face tokenizer is read from the model's directory (BiomedCLIP's layout)
            save_tokenizer = getattr(getattr(self.tokenizer, "tokenizer", None), "save_pretrained", None)
            if callable(save_tokenizer):
                save_tokenizer(tmp)

        return replace_dir_atomically(out_dir, fill)
