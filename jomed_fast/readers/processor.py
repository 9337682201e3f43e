"""``ReaderProcessor``: (PIL images, chat messages) -> model inputs, without torchvision.

The Hugging Face processors of both families import torchvision in transformers 5.x (the Qwen2-VL
video processor, ``PixtralProcessor``), which cannot sit beside the CPU torch build. This layer
uses only the tokenizer and the PIL-backend image processors (``Qwen2VLImageProcessorPil``,
``PixtralImageProcessorPil``) and expands the image placeholders itself, at the token-id level:

* **Qwen2-VL**: the chat template writes ``<|vision_start|><|image_pad|><|vision_end|>`` per image;
  the one ``<|image_pad|>`` becomes ``t * h * w / merge**2`` copies (``image_grid_thw`` from the
  image processor), and ``mm_token_type_ids`` marks them with 1 (text 0) so the model can build its
  3-D M-RoPE positions.
* **Pixtral**: the template writes one ``[IMG]`` per image; it becomes ``rows`` rows of ``cols``
  ``[IMG]`` each closed by ``[IMG_BREAK]``, the last row closed by ``[IMG_END]``, with
  ``rows, cols = H // patch, W // patch`` of the resized image (``image_sizes``).

Expanding ids rather than text gives the same ids as expanding the text first (the placeholders
are special tokens, so the text around them splits the same way) and never builds long strings.
Only images are supported (no video).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("qwen2_vl", "pixtral")
IGNORE_INDEX = -100


class ReaderProcessor:
    """Tokenizer + PIL image processor + placeholder expansion for one reader family.

    ``encode(images, messages)`` returns a dict of tensors ready for the HF model's ``forward``:
    ``input_ids`` and ``attention_mask`` ``[1, L]``, plus ``pixel_values`` and ``image_grid_thw``
    and ``mm_token_type_ids`` (Qwen2-VL) or ``pixel_values`` and ``image_sizes`` (Pixtral) when
    there are images. ``encode_batch`` pads several samples.
    """

    def __init__(self, family: str, tokenizer, image_processor):
        if family not in FAMILIES:
            raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
        self.family = family
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        conv = tokenizer.convert_tokens_to_ids
        unk = tokenizer.unk_token_id

        def need(token: str) -> int:
            i = conv(token)
            if i is None or (unk is not None and i == unk and token != tokenizer.unk_token):
                raise ValueError(f"tokenizer: the {family} tokenizer has no {token!r} token")
            return int(i)

        if family == "qwen2_vl":
            self.image_token = "<|image_pad|>"
            self.image_token_id = need("<|image_pad|>")
            self.video_token_id = need("<|video_pad|>")
            self.vision_start_token_id = need("<|vision_start|>")
            self.vision_end_token_id = need("<|vision_end|>")
            self.image_break_token_id = None
            self.image_end_token_id = None
            self.end_of_turn_token_id = need("<|im_end|>")
            self.merge_size = int(image_processor.merge_size)
            self.patch_size = int(image_processor.patch_size)
        else:
            self.image_token = "[IMG]"
            self.image_token_id = need("[IMG]")
            self.image_break_token_id = need("[IMG_BREAK]")
            self.image_end_token_id = need("[IMG_END]")
            self.video_token_id = None
            self.vision_start_token_id = None
            self.vision_end_token_id = None
            self.end_of_turn_token_id = need("</s>")
            self.merge_size = 1
            ps = image_processor.patch_size
            self.patch_size = int(ps["height"] if isinstance(ps, dict) else getattr(ps, "height", ps))
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else int(self.end_of_turn_token_id)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, family: str) -> "ReaderProcessor":
        """Load the tokenizer and the PIL image processor of a local checkpoint directory."""
        from transformers import AutoTokenizer

        path = Path(path)
        if family == "qwen2_vl":
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
                Qwen2VLImageProcessorPil as ImageProcessor,
            )
        elif family == "pixtral":
            from transformers.models.pixtral.image_processing_pil_pixtral import (
                PixtralImageProcessorPil as ImageProcessor,
            )
        else:
            raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
        if not (path / "preprocessor_config.json").is_file():
            raise ValueError(f"path: {str(path)!r} has no preprocessor_config.json (image processor)")
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        image_processor = ImageProcessor.from_pretrained(path, local_files_only=True)
        return cls(family, tokenizer, image_processor)

    # ------------------------------------------------------------------ facts
    @property
    def image_token_ids(self) -> tuple[int, ...]:
        """Every id that stands for image content in ``input_ids`` (Pixtral: [IMG], [IMG_BREAK], [IMG_END])."""
        if self.family == "qwen2_vl":
            return (self.image_token_id,)
        return (self.image_token_id, self.image_break_token_id, self.image_end_token_id)

    @property
    def mrope(self) -> bool:
        """Whether the reader's positions are 3-D M-RoPE, numbered from each image's patch grid
        (Qwen2-VL), rather than 1-D RoPE (Pixtral)."""
        return self.family == "qwen2_vl"

    # ------------------------------------------------------------------ pieces
    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The chat template's text, one placeholder token per image."""
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
            raise TypeError(f"messages: expected a list of dicts (role, content), got {type(messages).__name__}")
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def preprocess_images(self, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Run the PIL image processor: ``pixel_values`` + ``image_grid_thw`` (Qwen2-VL) or ``image_sizes`` (Pixtral)."""
        images = list(images)
        if not images:
            return {}
        out = self.image_processor(images=images, return_tensors="pt")
        if self.family == "qwen2_vl":
            return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"].long()}
        sizes = out["image_sizes"]
        sizes = torch.as_tensor(sizes if not isinstance(sizes, torch.Tensor) else sizes.tolist()).long()
        return {"pixel_values": out["pixel_values"], "image_sizes": sizes.reshape(-1, 2)}

    def split_images(
        self,
        image_inputs: dict[str, torch.Tensor],
    ) -> tuple[list[torch.Tensor], list[tuple[int, ...]]]:
        """``preprocess_images``' output image by image: ``(pixels, shapes)``, one entry per image.

        Qwen2-VL: ``pixels[i]`` the ``[t*h*w, D]`` patch rows of image i, ``shapes[i]`` its patch
        grid ``(t, h, w)`` (the grid its M-RoPE positions are numbered from). Pixtral: ``pixels[i]``
        ``[3, height, width]``, cropped to the resized image (the processor pads the batch to its
        largest), ``shapes[i]`` that ``(height, width)``.
        """
        if not image_inputs:
            return [], []
        if self.family == "qwen2_vl":
            grids = [tuple(g) for g in image_inputs["image_grid_thw"].tolist()]
            return list(torch.split(image_inputs["pixel_values"], [t * h * w for t, h, w in grids])), grids
        sizes = [tuple(s) for s in image_inputs["image_sizes"].tolist()]
        return [image_inputs["pixel_values"][i, :, :h, :w] for i, (h, w) in enumerate(sizes)], sizes

    def image_patches(self, shape: tuple[int, ...]) -> int:
        """Patches the vision tower runs for an image of ``shape`` (``split_images``): its sequence length there."""
        if self.family == "qwen2_vl":
            t, h, w = shape
            return t * h * w
        h, w = shape
        return (h // self.patch_size) * (w // self.patch_size)

    def vision_inputs(
        self, pixels: Sequence[torch.Tensor], shapes: Sequence[tuple[int, ...]], device, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """The keyword arguments of the HF model's ``get_image_features`` for several images of
        ``split_images``, on ``device`` in ``dtype``: Qwen2-VL's patch rows concatenated with their
        ``image_grid_thw``; Pixtral's images zero-padded to the largest with their ``image_sizes``."""
        if self.family == "qwen2_vl":
            return {
                "pixel_values": torch.cat(list(pixels)).to(device, dtype),
                "image_grid_thw": torch.tensor(list(shapes), dtype=torch.long, device=device),
            }
        H, W = max(h for h, _ in shapes), max(w for _, w in shapes)
        pixel_values = torch.zeros(len(shapes), 3, H, W, dtype=dtype, device=device)
        for i, (px, (h, w)) in enumerate(zip(pixels, shapes)):
            pixel_values[i, :, :h, :w] = px
        return {
            "pixel_values": pixel_values,
            "image_sizes": torch.tensor(list(shapes), dtype=torch.long, device=device),
        }

    def image_placeholder_ids(self, image_inputs: dict[str, torch.Tensor], index: int) -> list[int]:
        """The ids that stand for image ``index`` of ``image_inputs`` (from ``preprocess_images``)."""
        if self.family == "qwen2_vl":
            t, h, w = (int(x) for x in image_inputs["image_grid_thw"][index])
            return [self.image_token_id] * (t * h * w // self.merge_size**2)
        height, width = (int(x) for x in image_inputs["image_sizes"][index])
        rows, cols = height // self.patch_size, width // self.patch_size
        ids = ([self.image_token_id] * cols + [self.image_break_token_id]) * rows
        ids[-1] = self.image_end_token_id
        return ids

    def expand_image_tokens(self, ids: Sequence[int], image_inputs: dict[str, torch.Tensor]) -> list[int]:
        """Replace the k-th placeholder id of ``ids`` by the expansion of image k."""
        n_images = (
            0
            if not image_inputs
            else len(image_inputs["pixel_values" if self.family == "pixtral" else "image_grid_thw"])
        )
        n_slots = sum(1 for i in ids if i == self.image_token_id)
        if n_slots != n_images:
            raise ValueError(
                f"images: the prompt has {n_slots} image placeholder(s) ({self.image_token}) but {n_images} image(s) came"
            )
        if self.family == "qwen2_vl" and self.video_token_id in ids:
            raise ValueError("messages: video content is not supported by the readers")
        placeholders = [self.image_placeholder_ids(image_inputs, k) for k in range(n_images)]
        return self.expand_placeholders([int(i) for i in ids], placeholders)[0]

    def expand_placeholders(
        self, ids: list[int], placeholders: Sequence[Sequence[int]]
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """``ids`` with its k-th image placeholder token replaced by ``placeholders[k]`` (from
        ``image_placeholder_ids``), and the ``(start, length)`` of each expansion in the result.
        ``ids`` must hold ``len(placeholders)`` placeholder tokens."""
        found = ids.count(self.image_token_id)
        if found != len(placeholders):
            raise ValueError(
                f"ids: expected {len(placeholders)} image placeholder(s) ({self.image_token}), got {found}"
            )
        out: list[int] = []
        spans: list[tuple[int, int]] = []
        start = 0
        for ph in placeholders:
            at = ids.index(self.image_token_id, start)  # list.index: the scan runs in C
            out.extend(ids[start:at])
            spans.append((len(out), len(ph)))
            out.extend(ph)
            start = at + 1
        out.extend(ids[start:])
        return out, spans

    def mm_token_type_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """1 where ``input_ids`` is an image token, 0 elsewhere (Qwen2-VL's M-RoPE input)."""
        return (input_ids == self.image_token_id).to(torch.int32)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` with no special tokens added (special tokens in the text are kept)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------------ encode
    @staticmethod
    def _images_from_messages(messages: Sequence[dict]) -> list[Any]:
        found = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, (list, tuple)):
                for part in content:
                    if isinstance(part, dict) and part.get("type") == "image" and part.get("image") is not None:
                        found.append(part["image"])
        return found

    def _sample_ids(
        self, images, messages, text, add_generation_prompt, answer
    ) -> tuple[list[int], list[int] | None, list[Any]]:
        if (messages is None) == (text is None):
            raise ValueError("messages/text: give exactly one of them")
        if images is None:
            images = self._images_from_messages(messages) if messages is not None else []
        if not isinstance(images, (list, tuple)):
            raise TypeError(f"images: expected a list of PIL images, got {type(images).__name__}")
        if text is None:
            text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        ids = self.tokenize(text)
        labels = None
        if answer is not None:
            if not isinstance(answer, str):
                raise TypeError(f"answer: expected a str, got {type(answer).__name__}")
            target = self.tokenize(answer) + [self.end_of_turn_token_id]
            labels = [IGNORE_INDEX] * len(ids) + target
            ids = ids + target
        return ids, labels, list(images)

    def encode(
        self,
        images: Sequence[Any] | None = None,
        messages: Sequence[dict] | None = None,
        *,
        text: str | None = None,
        add_generation_prompt: bool = True,
        answer: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """One sample: ``images`` in the order of the image parts of ``messages`` (or of the
        placeholders of a ready ``text``). ``images=None`` takes them from ``{"type": "image",
        "image": PIL}`` parts. ``answer`` appends the answer and the end-of-turn token and returns
        ``labels`` (``-100`` on the prompt) for teacher forcing."""
        return self.encode_batch(
            [(images, messages)] if text is None else [(images, None)],
            texts=None if text is None else [text],
            add_generation_prompt=add_generation_prompt,
            answers=None if answer is None else [answer],
        )

    __call__ = encode

    def encode_batch(
        self,
        samples: Sequence[tuple[Sequence[Any] | None, Sequence[dict] | None]],
        *,
        texts: Sequence[str] | None = None,
        add_generation_prompt: bool = True,
        answers: Sequence[str] | None = None,
        padding_side: str = "right",
    ) -> dict[str, torch.Tensor]:
        """Several ``(images, messages)`` samples, padded to the longest with ``attention_mask``.
        Images of all samples are processed together, in sample order (what the model expects)."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side: expected 'left' or 'right', got {padding_side!r}")
        samples = list(samples)
        if not samples:
            raise ValueError("samples: expected at least one sample, got none")
        if texts is not None and len(texts) != len(samples):
            raise ValueError(f"texts: expected {len(samples)} texts, got {len(texts)}")
        if answers is not None and len(answers) != len(samples):
            raise ValueError(f"answers: expected {len(samples)} answers, got {len(answers)}")
        rows, all_images, per_sample = [], [], []
        for j, (images, messages) in enumerate(samples):
            ids, labels, imgs = self._sample_ids(
                images,
                messages if texts is None else None,
                None if texts is None else texts[j],
                add_generation_prompt,
                None if answers is None else answers[j],
            )
            rows.append((ids, labels))
            per_sample.append(len(imgs))
            all_images.extend(imgs)
        image_inputs = self.preprocess_images(all_images)

        expanded, expanded_labels = [], []
        start = 0
        for (ids, labels), n in zip(rows, per_sample):
            sub = self._slice_images(image_inputs, start, n)
            start += n
            new_ids = self.expand_image_tokens(ids, sub)
            expanded.append(new_ids)
            if labels is not None:
                # the answer follows the prompt: labels keep their tail, the (expanded) prompt is ignored
                n_target = sum(1 for x in labels if x != IGNORE_INDEX)
                tail = labels[len(labels) - n_target :]
                expanded_labels.append([IGNORE_INDEX] * (len(new_ids) - n_target) + tail)

        length = max(len(x) for x in expanded)
        input_ids = torch.full((len(expanded), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(expanded), length), dtype=torch.long)
        labels_t = torch.full((len(expanded), length), IGNORE_INDEX, dtype=torch.long) if answers is not None else None
        for r, ids in enumerate(expanded):
            sl = slice(0, len(ids)) if padding_side == "right" else slice(length - len(ids), length)
            input_ids[r, sl] = torch.tensor(ids, dtype=torch.long)
            attention_mask[r, sl] = 1
            if labels_t is not None:
                labels_t[r, sl] = torch.tensor(expanded_labels[r], dtype=torch.long)
        out: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.family == "qwen2_vl":
            out["mm_token_type_ids"] = self.mm_token_type_ids(input_ids) * attention_mask.to(torch.int32)
        out.update(image_inputs)
        if labels_t is not None:
            out["labels"] = labels_t
        return out

    def _slice_images(self, image_inputs: dict[str, torch.Tensor], start: int, n: int) -> dict[str, torch.Tensor]:
        if n == 0 or not image_inputs:
            return {}
        if self.family == "qwen2_vl":
            return {"image_grid_thw": image_inputs["image_grid_thw"][start : start + n]}
        return {
            "pixel_values": image_inputs["pixel_values"][start : start + n],
            "image_sizes": image_inputs["image_sizes"][start : start + n],
        }

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return (
            f"ReaderProcessor(family={self.family!r}, vocab={len(self.tokenizer)}, "
            f"image_token_ids={self.image_token_ids}, patch={self.patch_size}, merge={self.merge_size})"
        )


__all__ = ["ReaderProcessor", "FAMILIES", "IGNORE_INDEX"]
