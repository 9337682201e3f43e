r"""Dual-head retrieval: a trainable query encoder over a frozen base encoder, and merged top-k.

Both heads encode the query image with the image tower :math:`q = f_I(x) \in \mathbb{R}^D`:

* text head:  :math:`s^{T}_n = q \cdot t_n` (index caption embeddings ``[N, D]``)
* image head: :math:`s^{I}_n = q \cdot i_n` (index image embeddings ``[N, D]``)

Query embedding with mixing: :math:`q = \mathrm{norm}(\alpha\, q_{learned} + (1-\alpha)\, q_{frozen})`
(reference :math:`\alpha = 0.15`; ``alpha=None`` uses the learned embedding alone). After stage 2
each head has its own ``QueryEncoder`` (``retriever.head_encoders.HeadEncoders``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Candidates:
    """Merged candidates of Q queries: ``ids`` / ``scores`` ``[Q, K]`` and ``heads`` (``"text"``/``"image"``) ``[Q][K]``."""

    ids: torch.Tensor
    scores: torch.Tensor
    heads: list


class QueryEncoder(nn.Module):
    """Trainable query image encoder: the last ``n_trainable`` image-tower layers unfrozen (capped at depth).

    Keeps a frozen copy of the base encoder (``self.frozen``) for candidate retrieval and for the mix;
    :meth:`refresh` copies the learned weights into it (reference: every 10 steps).
    """

    # the base encoder and its frozen copy: modules with encode_images / image_layers (TinyCLIP,
    # retriever.hf's adapters), duck-typed, so Any to the type checker
    learned: Any
    frozen: Any

    def __init__(self, base: nn.Module, n_trainable: int = 10, alpha: Optional[float] = None):
        super().__init__()
        if n_trainable < 0:
            raise ValueError(f"n_trainable: expected >= 0, got {n_trainable}")
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha: expected None or a float in [0, 1], got {alpha}")
        self.learned = base
        self.frozen = copy.deepcopy(base).eval().requires_grad_(False)
        self.alpha = alpha
        layers = self.learned.image_layers()
        self.n_trainable = min(n_trainable, len(layers))
        base.requires_grad_(False)
        for layer in layers[len(layers) - self.n_trainable :]:
            layer.requires_grad_(True)
        if self.n_trainable > 0:
            for head in getattr(base, "image_head_modules", lambda: [])():
                head.requires_grad_(True)

    def forward(self, images) -> torch.Tensor:
        q = self.learned.encode_images(images)
        if self.alpha is None:
            return q
        with torch.no_grad():
            q0 = self.frozen.encode_images(images)
        return F.normalize(self.alpha * q + (1 - self.alpha) * q0, dim=-1)

    @torch.no_grad()
    def refresh(self) -> None:
        self.frozen.load_state_dict(self.learned.state_dict())

    @torch.no_grad()
    def retrieval_queries(self, images) -> torch.Tensor:
        """Query embeddings ``[Q, D]`` from the frozen copy (what retrieves the training candidates)."""
        return self.frozen.encode_images(images)


def merge_heads(text: tuple, image: tuple) -> Candidates:
    """Concatenate the top-k of each head (``(scores [Q, k], ids [Q, k])``) into one list per query.

    A record found by both heads appears twice, tagged once per head (the scores are not comparable
    across heads, so no de-duplication by score). Output sorted by head: text first, then image.
    """
    (st, it), (si, ii) = text, image
    if st.shape[0] != si.shape[0]:
        raise ValueError(f"image: expected {st.shape[0]} query rows like the text head, got {si.shape[0]}")
    heads = [["text"] * st.shape[1] + ["image"] * si.shape[1] for _ in range(st.shape[0])]
    return Candidates(ids=torch.cat([it, ii], 1), scores=torch.cat([st, si], 1), heads=heads)
