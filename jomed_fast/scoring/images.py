"""The images of one ``score`` call: each distinct image preprocessed once and encoded once.

Images are told apart by object identity (``id``): a query image that appears in the K prompts of
its query (``paper`` layout) and an index record retrieved for several queries are one entry each.
The table converts arrays to PIL once, runs the PIL image processor on all of them in one call,
gives each image's placeholder ids (what replaces its one placeholder token in a prompt), runs
the vision tower + projector over them in chunks sized by the memory budget, and puts the features
in place of the image tokens of the prompts' embeddings (``embed``).

What differs by family is the reader's image format's (``readers.image_formats``, reached through
``ReaderProcessor.split_images``, ``image_patches``, ``vision_inputs``, ``mrope``):

* Qwen2-VL / Qwen2.5-VL: ``pixel_values`` rows are the image's ``t*h*w`` patches; the vision tower
  merges ``merge**2`` patches per token: ``t*h*w/merge**2`` features = placeholder tokens. Images
  are independent in the tower (block-diagonal attention over ``cu_seqlens``; Qwen2.5-VL's windows
  lie within an image), so a chunk of images gives each image the features it gets alone.
* Pixtral: ``pixel_values`` are ``[3, H, W]`` per image (stored cropped to the image's size and
  re-padded per chunk); ``rows * cols`` features fill the ``[IMG]`` tokens of a placeholder that
  also holds ``[IMG_BREAK]`` / ``[IMG_END]`` (ordinary embeddings). The tower attends
  block-diagonally across images too.
* any other family (its HF processor's expansion): one ``[C, H, W]`` tensor per image, stacked
  per chunk (a batch dimension the tower keeps apart); the features fill the image tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from .._profiling import stage
from ..prompts import as_image


class ImageTable:
    """Distinct images of one call; ``add`` returns an image's index (uid).

    After ``preprocess``: per uid ``pixels``, ``shapes`` (``ReaderProcessor.split_images``),
    ``placeholders`` (the ids replacing its placeholder token), ``num_features`` (its ``[IMG]`` /
    ``<|image_pad|>`` tokens) and ``feature_offsets``. After ``encode``: ``features``.
    """

    def __init__(self, processor):
        self.processor = processor
        self._index: dict[int, int] = {}
        self._objects: list[Any] = []  # keeps every object alive, so ids stay unique during the call
        self._pil: list[Any] = []
        self.pixels: list[Any] = []  # per image, what the format's split gives
        self.shapes: list[
            tuple[int, ...]
        ] = []  # Qwen2-VL patch grid (t, h, w), Pixtral (height, width), generic (C, H, W)
        self.placeholders: list[list[int]] = []
        self.num_features: list[int] = []
        self.feature_offsets: list[int] = []
        self.features: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self._objects)

    def uid(self, image: Any) -> int:
        return self._index[id(image)]

    def add(self, image: Any, name: str) -> int:
        key = id(image)
        if key in self._index:
            return self._index[key]
        self._pil.append(as_image(image, name))
        self._objects.append(image)
        self._index[key] = len(self._objects) - 1
        return self._index[key]

    # ------------------------------------------------------------------ preprocessing
    def preprocess(self) -> None:
        """Run the image processor on every image (one call) and split its output per image."""
        proc = self.processor
        if not self._pil:
            return
        out = proc.preprocess_images(self._pil)
        self.pixels, self.shapes = proc.split_images(out)
        offset = 0
        for i in range(len(self._pil)):
            ids = proc.image_placeholder_ids(out, i)
            self.placeholders.append(ids)
            n = sum(1 for t in ids if t == proc.image_token_id)
            self.num_features.append(n)
            self.feature_offsets.append(offset)
            offset += n
        self._pil = []  # the pixels are all that is needed from here on

    @property
    def total_features(self) -> int:
        return sum(self.num_features)

    def patches(self, uid: int) -> int:
        """Patches the vision tower runs for image ``uid`` (its sequence length there)."""
        return self.processor.image_patches(self.shapes[uid])

    def grids(self, uids: list[int]) -> torch.Tensor | None:
        """``[n, 3]`` long patch grids of images ``uids``, what the packer numbers M-RoPE positions
        from; None for a reader without M-RoPE (the packer takes no grids then)."""
        if not self.processor.mrope:
            return None
        return torch.tensor([self.shapes[u] for u in uids], dtype=torch.long).reshape(-1, 3)

    def feature_rows(self, uids: list[int]) -> list[int]:
        """Rows of ``features`` holding images ``uids``' features, image after image."""
        rows: list[int] = []
        for u in uids:
            off = self.feature_offsets[u]
            rows.extend(range(off, off + self.num_features[u]))
        return rows

    # ------------------------------------------------------------------ encoding
    def encode(self, reader, max_patches: int) -> torch.Tensor:
        """Vision tower + projector over every image: ``features [total_features, H]`` in the
        compute dtype, image ``uid`` at rows ``feature_offsets[uid] : + num_features[uid]``. Images
        go in chunks of at most ``max_patches`` patches (at least one image per chunk)."""
        model = reader.hf_model.model
        feats: list[torch.Tensor] = []
        chunk: list[int] = []
        patches = 0

        def flush():
            if chunk:
                with stage("jomed.vision"):
                    feats.append(self._encode_chunk(reader, model, chunk))

        for uid in range(len(self)):
            n = self.patches(uid)
            if chunk and patches + n > max_patches:
                flush()
                chunk, patches = [], 0
            chunk.append(uid)
            patches += n
        flush()
        if not feats:
            self.features = torch.empty(0, reader.hidden_size, device=reader.device, dtype=reader.compute_dtype)
        else:
            self.features = torch.cat(feats, dim=0)
        return self.features

    def _encode_chunk(self, reader, model, uids: list[int]) -> torch.Tensor:
        dtype = reader.compute_dtype
        inputs = self.processor.vision_inputs(
            [self.pixels[u] for u in uids], [self.shapes[u] for u in uids], reader.device, dtype
        )
        pooled = model.get_image_features(**inputs).pooler_output
        pooled = torch.cat(list(pooled), dim=0) if isinstance(pooled, (list, tuple)) else pooled
        expected = sum(self.num_features[u] for u in uids)
        if pooled.shape[0] != expected:
            raise RuntimeError(  # the processor and the tower disagree: a reader/config mismatch
                f"reader: the vision tower gave {pooled.shape[0]} features for {expected} image tokens"
            )
        return pooled.to(dtype)

    # ------------------------------------------------------------------ embedding
    def embed(self, reader, ids: torch.Tensor, uids: list[int]) -> torch.Tensor:
        """The token embeddings of ``ids`` (any shape, CPU) on the reader's device, the image
        tokens (``image_token_id``, in order) replaced by the features of images ``uids`` (after
        ``encode``). ``[..., H]``."""
        dev = reader.device
        x = reader.hf_model.get_input_embeddings()(ids.to(dev))
        rows = self.feature_rows(uids)
        if rows:
            if self.features is None:
                raise RuntimeError("images: embed needs the features; run encode first")
            mask = (ids == self.processor.image_token_id).to(dev)[..., None]
            src = self.features.index_select(0, torch.tensor(rows, dtype=torch.long, device=dev))
            x = x.masked_scatter(mask, src.to(x.dtype))
        return x
