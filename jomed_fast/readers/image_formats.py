"""Image formats: how a family's image processor output becomes placeholder ids and vision inputs.

A ``ReaderProcessor`` holds one format (``Family.image_format``); the scorer's ``ImageTable`` and
``encode`` reach the family's images only through it. Each format answers the same questions:
the image placeholder token; the images in an image-processor output (``count``, ``slice``); each
image's pixels and shape (``split``) and the ids its one placeholder becomes
(``placeholder_ids``); the patches the tower runs per image (``patches``); the
``get_image_features`` arguments for several images (``vision_inputs``); extra model inputs read
off the ids (``text_inputs``).

=================  ===========================================================================
``PatchRows``      Qwen2-VL, Qwen2.5-VL (``Qwen2VLImageProcessorPil``): ``pixel_values`` rows are
                   an image's ``t·h·w`` patches, ``image_grid_thw`` its grid; the one
                   ``<|image_pad|>`` becomes ``t·h·w / merge²`` copies; ``mm_token_type_ids``
                   marks them (the model's M-RoPE input). Images are independent in the tower
                   (block-diagonal attention over ``cu_seqlens``, windows within an image).
``PixtralImages``  Pixtral (``PixtralImageProcessorPil``): ``[3, H, W]`` per image (cropped to the
                   image's size, re-padded per chunk), ``rows`` rows of ``cols`` ``[IMG]`` each
                   closed by ``[IMG_BREAK]``, the last by ``[IMG_END]``.
``ProcessorImages`` any other family: the checkpoint's own HF processor (its PIL image
                   processor; no torchvision) gives the pixels and, through its
                   ``replace_image_token``, the expansion of each image, tokenized. It takes
                   processors whose every image is one ``[C, H, W]`` tensor in ``pixel_values``
                   (fixed-size, untiled) and whose expansion is special tokens only (ordinary
                   text in it could tokenize differently beside the prompt's own text).
=================  ===========================================================================
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "ImageFormat",
    "PatchRows",
    "PixtralImages",
    "ProcessorImages",
    "known_image_format",
    "load_image_format",
    "require_token_id",
]


def require_token_id(tokenizer, token: str, family: str) -> int:
    """The id of ``token``; a ``ValueError`` naming the family when the tokenizer lacks it."""
    i = tokenizer.convert_tokens_to_ids(token)
    unk = tokenizer.unk_token_id
    if i is None or (unk is not None and i == unk and token != tokenizer.unk_token):
        raise ValueError(f"tokenizer: the {family} tokenizer has no {token!r} token")
    return int(i)


class ImageFormat(abc.ABC):
    """The questions every format answers (see the module docstring); ``mrope`` and
    ``merge_size`` say how the packer numbers an image's positions."""

    image_processor: Any
    image_token: str
    image_token_id: int
    image_token_ids: tuple[int, ...]  # every id standing for image content in ``input_ids``
    patch_size: int
    merge_size: int = 1
    mrope: bool = False

    @abc.abstractmethod
    def preprocess(self, images: list[Any]) -> dict[str, torch.Tensor]: ...

    def count(self, image_inputs: dict[str, torch.Tensor]) -> int:
        return len(image_inputs["pixel_values"]) if image_inputs else 0

    def slice(self, image_inputs: dict[str, torch.Tensor], start: int, n: int) -> dict[str, torch.Tensor]:
        return {k: v[start : start + n] for k, v in image_inputs.items()}

    @abc.abstractmethod
    def split(self, image_inputs: dict[str, torch.Tensor]) -> tuple[list[Any], list[tuple[int, ...]]]: ...

    @abc.abstractmethod
    def patches(self, shape: tuple[int, ...]) -> int: ...

    @abc.abstractmethod
    def vision_inputs(
        self, pixels: Sequence[Any], shapes: Sequence[tuple[int, ...]], device, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]: ...

    @abc.abstractmethod
    def placeholder_ids(self, image_inputs: dict[str, torch.Tensor], index: int) -> list[int]: ...

    def text_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def check_ids(self, ids: Sequence[int]) -> None:
        """Raise for ids this format cannot take (e.g. a video placeholder); by default it takes all."""
        return None


class PatchRows(ImageFormat):
    """Qwen2-VL / Qwen2.5-VL: ``split`` gives ``[t·h·w, D]`` patch rows and the grid ``(t, h, w)``."""

    mrope = True

    def __init__(self, family: str, tokenizer, image_processor):
        self.image_processor = image_processor
        self.image_token = "<|image_pad|>"
        self.image_token_id = require_token_id(tokenizer, self.image_token, family)
        self.image_token_ids = (self.image_token_id,)
        self.video_token_id = require_token_id(tokenizer, "<|video_pad|>", family)
        self.vision_start_token_id = require_token_id(tokenizer, "<|vision_start|>", family)
        self.vision_end_token_id = require_token_id(tokenizer, "<|vision_end|>", family)
        self.merge_size = int(image_processor.merge_size)
        self.patch_size = int(image_processor.patch_size)

    def preprocess(self, images):
        out = self.image_processor(images=images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"].long()}

    def count(self, image_inputs):
        return len(image_inputs["image_grid_thw"]) if image_inputs else 0

    def slice(self, image_inputs, start, n):  # the grids are all encode_batch needs per sample
        return {"image_grid_thw": image_inputs["image_grid_thw"][start : start + n]}

    def split(self, image_inputs):
        grids = [tuple(g) for g in image_inputs["image_grid_thw"].tolist()]
        return list(torch.split(image_inputs["pixel_values"], [t * h * w for t, h, w in grids])), grids

    def patches(self, shape):
        t, h, w = shape
        return t * h * w

    def vision_inputs(self, pixels, shapes, device, dtype):
        return {
            "pixel_values": torch.cat(list(pixels)).to(device, dtype),
            "image_grid_thw": torch.tensor(list(shapes), dtype=torch.long, device=device),
        }

    def placeholder_ids(self, image_inputs, index):
        t, h, w = (int(x) for x in image_inputs["image_grid_thw"][index])
        return [self.image_token_id] * (t * h * w // self.merge_size**2)

    def text_inputs(self, input_ids, attention_mask):
        return {
            "mm_token_type_ids": (input_ids == self.image_token_id).to(torch.int32) * attention_mask.to(torch.int32)
        }

    def check_ids(self, ids):
        if self.video_token_id in ids:
            raise ValueError("messages: video content is not supported by the readers")


class PixtralImages(ImageFormat):
    """Pixtral: ``split`` gives ``[3, height, width]`` (the processor pads a batch to its largest;
    each image is cropped back) and ``(height, width)``."""

    def __init__(self, family: str, tokenizer, image_processor):
        self.image_processor = image_processor
        self.image_token = "[IMG]"
        self.image_token_id = require_token_id(tokenizer, "[IMG]", family)
        self.image_break_token_id = require_token_id(tokenizer, "[IMG_BREAK]", family)
        self.image_end_token_id = require_token_id(tokenizer, "[IMG_END]", family)
        self.image_token_ids = (self.image_token_id, self.image_break_token_id, self.image_end_token_id)
        ps = image_processor.patch_size
        self.patch_size = int(ps["height"] if isinstance(ps, dict) else getattr(ps, "height", ps))

    def preprocess(self, images):
        out = self.image_processor(images=images, return_tensors="pt")
        sizes = out["image_sizes"]
        sizes = torch.as_tensor(sizes if not isinstance(sizes, torch.Tensor) else sizes.tolist()).long()
        return {"pixel_values": out["pixel_values"], "image_sizes": sizes.reshape(-1, 2)}

    def split(self, image_inputs):
        sizes = [tuple(s) for s in image_inputs["image_sizes"].tolist()]
        return [image_inputs["pixel_values"][i, :, :h, :w] for i, (h, w) in enumerate(sizes)], sizes

    def patches(self, shape):
        h, w = shape
        return (h // self.patch_size) * (w // self.patch_size)

    def vision_inputs(self, pixels, shapes, device, dtype):
        H, W = max(h for h, _ in shapes), max(w for _, w in shapes)
        pixel_values = torch.zeros(len(shapes), 3, H, W, dtype=dtype, device=device)
        for i, (px, (h, w)) in enumerate(zip(pixels, shapes)):
            pixel_values[i, :, :h, :w] = px
        return {
            "pixel_values": pixel_values,
            "image_sizes": torch.tensor(list(shapes), dtype=torch.long, device=device),
        }

    def placeholder_ids(self, image_inputs, index):
        height, width = (int(x) for x in image_inputs["image_sizes"][index])
        rows, cols = height // self.patch_size, width // self.patch_size
        ids = ([self.image_token_id] * cols + [self.image_break_token_id]) * rows
        ids[-1] = self.image_end_token_id
        return ids


class ProcessorImages(ImageFormat):
    """Any other family, through its HF processor (``ProcessorMixin``: ``image_token``,
    ``image_processor``, ``replace_image_token``). ``split`` gives each image's ``[C, H, W]``
    pixels and that shape."""

    def __init__(self, family: str, hf_processor, patch_size: int, image_token_id: int):
        self.family = family
        self.hf_processor = hf_processor
        self.image_processor = hf_processor.image_processor
        image_token = getattr(hf_processor, "image_token", None)
        if not image_token:
            raise ValueError(f"path: the {family} processor names no image_token to expand")
        self.image_token = str(image_token)
        tokenizer = hf_processor.tokenizer
        self.image_token_id = require_token_id(tokenizer, self.image_token, family)
        if self.image_token_id != image_token_id:
            raise ValueError(
                f"path: the {family} processor's image token {self.image_token!r} is id {self.image_token_id}, "
                f"the config's image_token_id is {image_token_id}"
            )
        self.patch_size = int(patch_size)
        self._special = set(tokenizer.all_special_ids) | {int(i) for i in tokenizer.added_tokens_decoder}
        self.image_token_ids = tuple(dict.fromkeys([self.image_token_id, *self._marker_ids(hf_processor)]))

    @staticmethod
    def _marker_ids(hf_processor) -> list[int]:
        ids = getattr(hf_processor, "image_token_ids", None) or []
        return [int(i) for i in ids if i is not None]

    def preprocess(self, images):
        out = dict(self.image_processor(images=images, return_tensors="pt"))
        extra = sorted(set(out) - {"pixel_values"})
        if extra:
            raise ValueError(
                f"images: the {self.family} image processor also returns {extra}, which the generic "
                "adapter does not pass to the vision tower (it takes pixel_values alone)"
            )
        pixels = out["pixel_values"]
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or pixels.shape[0] != len(images):
            shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            raise ValueError(
                f"images: the {self.family} image processor gave pixel_values {shape} for {len(images)} image(s); "
                "the generic adapter takes one [C, H, W] tensor per image (no tiles)"
            )
        return {"pixel_values": pixels}

    def split(self, image_inputs):
        pixels = list(image_inputs["pixel_values"])
        return pixels, [tuple(p.shape) for p in pixels]

    def patches(self, shape):
        _, h, w = shape
        return max(1, (h // self.patch_size) * (w // self.patch_size))

    def vision_inputs(self, pixels, shapes, device, dtype):
        if len(set(shapes)) > 1:  # one preprocess call stacks its images, so they share a shape
            raise ValueError(f"images: expected images of one shape per vision call, got {sorted(set(shapes))}")
        return {"pixel_values": torch.stack(list(pixels)).to(device, dtype)}

    def placeholder_ids(self, image_inputs, index):
        text = self.hf_processor.replace_image_token(image_inputs, image_idx=index)
        ids = [int(i) for i in self.hf_processor.tokenizer(text, add_special_tokens=False)["input_ids"]]
        ordinary = sorted({i for i in ids if i not in self._special})
        if ordinary:
            raise ValueError(
                f"images: the {self.family} processor expands an image into ordinary text tokens {ordinary[:5]}, which "
                "could tokenize differently beside the prompt's text; the generic adapter takes special tokens only"
            )
        return ids


def _load_hf_processor(path, family: str):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, ImportError) as exc:
        raise ValueError(f"path: cannot load the {family} processor of {str(path)!r} offline: {exc}") from exc


def known_image_format(family: str, tokenizer, image_processor) -> ImageFormat:
    """The image format of a family of ``families.KNOWN`` over a ready tokenizer and image processor."""
    from .families import KNOWN

    kind = KNOWN[family]["image_format"]
    return (PatchRows if kind == "patch_rows" else PixtralImages)(family, tokenizer, image_processor)


def load_image_format(path, family, tokenizer=None) -> ImageFormat:
    """The image format of ``family`` (a ``families.Family``) for the checkpoint at ``path``; the
    tokenizer is the processor's own for a generic family."""
    if family.image_format == "processor":
        return ProcessorImages(
            family.name, _load_hf_processor(path, family.name), family.patch_size, family.image_token_id
        )
    if not (path / "preprocessor_config.json").is_file():
        raise ValueError(f"path: {str(path)!r} has no preprocessor_config.json (image processor)")
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pil: Any = Qwen2VLImageProcessorPil if family.image_format == "patch_rows" else PixtralImageProcessorPil
    return known_image_format(family.name, tokenizer, pil.from_pretrained(path, local_files_only=True))
