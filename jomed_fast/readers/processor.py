"""``ReaderProcessor``: (PIL images, chat messages) -> model inputs, without torchvision.

The Hugging Face processors of the project's families import torchvision in transformers 5.x (the
Qwen2-VL video processor, ``PixtralProcessor``), which cannot sit beside the CPU torch build. This
layer uses the tokenizer and a PIL-backend image processor and expands the image placeholders
itself, at the token-id level; what an image expands to is the family's image format's
(``readers.image_formats``; the family from ``readers.families``):

* **Qwen2-VL / Qwen2.5-VL**: the chat template writes ``<|vision_start|><|image_pad|><|vision_end|>``
  per image; the one ``<|image_pad|>`` becomes ``t * h * w / merge**2`` copies (``image_grid_thw``
  from the image processor), and ``mm_token_type_ids`` marks them with 1 (text 0) so the model can
  build its 3-D M-RoPE positions.
* **Pixtral**: the template writes one ``[IMG]`` per image; it becomes ``rows`` rows of ``cols``
  ``[IMG]`` each closed by ``[IMG_BREAK]``, the last row closed by ``[IMG_END]``, with
  ``rows, cols = H // patch, W // patch`` of the resized image (``image_sizes``).
* **any other family**: the checkpoint's HF processor's ``replace_image_token`` says what each
  image's placeholder becomes (e.g. LLaVA: ``(crop / patch)²`` copies of ``<image>``).

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

from .families import KNOWN, Family, family_of
from .image_formats import ImageFormat, ProcessorImages, known_image_format, load_image_format, require_token_id

FAMILIES = tuple(KNOWN)
IGNORE_INDEX = -100


class ReaderProcessor:
    """Tokenizer + image format (image processor, placeholder expansion) of one reader family.

    ``encode(images, messages)`` returns a dict of tensors ready for the HF model's ``forward``:
    ``input_ids`` and ``attention_mask`` ``[1, L]``, plus the image processor's outputs when there
    are images (``pixel_values`` and ``image_grid_thw`` and ``mm_token_type_ids`` for Qwen2-VL,
    ``pixel_values`` and ``image_sizes`` for Pixtral, ``pixel_values`` for a generic family).
    ``encode_batch`` pads several samples.
    """

    def __init__(
        self,
        family: str,
        tokenizer,
        image_processor=None,
        *,
        images: ImageFormat | None = None,
        end_of_turn_token: str | None = None,
        templater=None,
    ):
        """``ReaderProcessor(family, tokenizer, image_processor)`` for a family of ``families.KNOWN``
        (its image format and end-of-turn token from the table), or ``images=`` a ready
        ``ImageFormat`` (a generic family: ``from_pretrained`` builds it from the HF processor)."""
        if images is None:
            if family not in KNOWN:
                raise ValueError(f"family: expected one of {FAMILIES} (or images= for another), got {family!r}")
            images = known_image_format(family, tokenizer, image_processor)
            end_of_turn_token = end_of_turn_token or KNOWN[family]["end_of_turn_token"]
        self.family = family
        self.tokenizer = tokenizer
        self.images = images
        self._templater = templater if templater is not None else tokenizer  # who holds the chat template
        if end_of_turn_token is None:
            if tokenizer.eos_token_id is None:
                raise ValueError(f"tokenizer: the {family} tokenizer has no eos token to close an answer with")
            self.end_of_turn_token_id = int(tokenizer.eos_token_id)
        else:
            self.end_of_turn_token_id = require_token_id(tokenizer, end_of_turn_token, family)
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else int(self.end_of_turn_token_id)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, family: str | Family) -> "ReaderProcessor":
        """Load the tokenizer and the PIL image processor of a local checkpoint directory.

        ``family``: the checkpoint's ``Family`` (``families.family_of``), or its name, which must be
        the family the directory's config is of."""
        from transformers import AutoConfig, AutoTokenizer

        path = Path(path)
        if not isinstance(family, Family):
            if not isinstance(family, str):
                raise TypeError(f"family: expected a family name or a Family, got {type(family).__name__}")
            found = family_of(AutoConfig.from_pretrained(path, local_files_only=True))
            if found.name != family:
                raise ValueError(f"family: {str(path)!r} holds a {found.name!r} checkpoint, got family {family!r}")
            family = found
        if family.image_format == "processor":  # the HF processor holds the tokenizer and the chat template
            images = load_image_format(path, family)
            assert isinstance(images, ProcessorImages)
            hf = images.hf_processor
            return cls(
                family.name, hf.tokenizer, images=images, end_of_turn_token=family.end_of_turn_token, templater=hf
            )
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        images = load_image_format(path, family, tokenizer)
        return cls(family.name, tokenizer, images=images, end_of_turn_token=family.end_of_turn_token)

    # ------------------------------------------------------------------ facts
    @property
    def image_processor(self):
        return self.images.image_processor

    @property
    def image_token(self) -> str:
        return self.images.image_token

    @property
    def image_token_id(self) -> int:
        """The placeholder token of an image (what the image features replace once expanded)."""
        return self.images.image_token_id

    @property
    def image_token_ids(self) -> tuple[int, ...]:
        """Every id that stands for image content in ``input_ids`` (Pixtral: [IMG], [IMG_BREAK], [IMG_END])."""
        return self.images.image_token_ids

    @property
    def mrope(self) -> bool:
        """Whether the reader's positions are 3-D M-RoPE, numbered from each image's patch grid
        (Qwen2-VL, Qwen2.5-VL), rather than 1-D RoPE."""
        return self.images.mrope

    @property
    def merge_size(self) -> int:
        return self.images.merge_size

    @property
    def patch_size(self) -> int:
        return self.images.patch_size

    # ------------------------------------------------------------------ pieces
    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The chat template's text, one placeholder token per image."""
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
            raise TypeError(f"messages: expected a list of dicts (role, content), got {type(messages).__name__}")
        return self._templater.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def preprocess_images(self, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Run the PIL image processor: ``pixel_values`` + ``image_grid_thw`` (Qwen2-VL) / ``image_sizes`` (Pixtral)."""
        images = list(images)
        return self.images.preprocess(images) if images else {}

    def split_images(
        self,
        image_inputs: dict[str, torch.Tensor],
    ) -> tuple[list[Any], list[tuple[int, ...]]]:
        """``preprocess_images``' output image by image: ``(pixels, shapes)``, one entry per image.

        Qwen2-VL: ``pixels[i]`` the ``[t*h*w, D]`` patch rows of image i, ``shapes[i]`` its patch
        grid ``(t, h, w)`` (the grid its M-RoPE positions are numbered from). Pixtral: ``pixels[i]``
        ``[3, height, width]``, cropped to the resized image (the processor pads the batch to its
        largest), ``shapes[i]`` that ``(height, width)``. Generic: ``[C, H, W]`` and its shape.
        """
        return self.images.split(image_inputs) if image_inputs else ([], [])

    def image_patches(self, shape: tuple[int, ...]) -> int:
        """Patches the vision tower runs for an image of ``shape`` (``split_images``): its sequence length there."""
        return self.images.patches(shape)

    def vision_inputs(
        self, pixels: Sequence[Any], shapes: Sequence[tuple[int, ...]], device, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """The keyword arguments of the HF model's ``get_image_features`` for several images of
        ``split_images``, on ``device`` in ``dtype``: Qwen2-VL's patch rows concatenated with their
        ``image_grid_thw``; Pixtral's images zero-padded to the largest with their ``image_sizes``;
        a generic family's images stacked."""
        return self.images.vision_inputs(pixels, shapes, device, dtype)

    def image_placeholder_ids(self, image_inputs: dict[str, torch.Tensor], index: int) -> list[int]:
        """The ids that stand for image ``index`` of ``image_inputs`` (from ``preprocess_images``)."""
        return self.images.placeholder_ids(image_inputs, index)

    def expand_image_tokens(self, ids: Sequence[int], image_inputs: dict[str, torch.Tensor]) -> list[int]:
        """Replace the k-th placeholder id of ``ids`` by the expansion of image k."""
        n_images = self.images.count(image_inputs)
        n_slots = sum(1 for i in ids if i == self.image_token_id)
        if n_slots != n_images:
            raise ValueError(
                f"images: the prompt has {n_slots} image placeholder(s) ({self.image_token}) but {n_images} image(s) came"
            )
        self.images.check_ids(ids)
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
        out.update(self.images.text_inputs(input_ids, attention_mask))
        out.update(image_inputs)
        if labels_t is not None:
            out["labels"] = labels_t
        return out

    def _slice_images(self, image_inputs: dict[str, torch.Tensor], start: int, n: int) -> dict[str, torch.Tensor]:
        if n == 0 or not image_inputs:
            return {}
        return self.images.slice(image_inputs, start, n)

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
