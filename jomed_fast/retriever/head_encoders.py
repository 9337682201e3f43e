r"""The retriever after stage 2: one trained query encoder per head (``HeadEncoders``).

The reference trains two query encoders, ``retriever`` for the image head and
``retriever_for_q_to_text`` for the text head, each from the base encoder with its own optimizer
(``train.py``: ``--train_retriever_img`` / ``--train_retriever_text``). One encoder serving both
heads would make them compete: on the synthetic task, training it for the text head costs the
image head what the text head gains. So each head ``h`` embeds the query with its own encoder,

.. math:: q_h = \mathrm{norm}(\alpha\, f_h(x) + (1-\alpha)\, f_0(x)) \in \mathbb{R}^D
          \quad(\text{or } f_h(x) \text{ when } \alpha \text{ is None}),

where :math:`f_0` is the frozen base encoder that built the index, and the index searches its
embeddings with :math:`q_h` (``Retrieval.search`` takes ``{"text": q_text, "image": q_image}``).

On disk (``save`` / ``load_head_encoders``)::

    out_dir/heads.json      {"alpha": ..., "format": 1}
    out_dir/text/           the text head's trained encoder (TinyCLIP or Hugging Face CLIP files)
    out_dir/image/          the image head's
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from .._files import replace_dir_atomically
from .._manifest import verify_dir
from .dual import QueryEncoder
from .encoder_io import load_encoder, save_encoder

__all__ = ["HEAD_NAMES", "HeadEncoders", "load_head_encoders"]

HEAD_NAMES = ("text", "image")
HEADS_FILE = "heads.json"


class HeadEncoders(nn.Module):
    """Per-head query encoders; ``encode_images(images) -> {"text": [Q, D], "image": [Q, D]}``."""

    def __init__(self, text: QueryEncoder, image: QueryEncoder):
        super().__init__()
        for name, enc in (("text", text), ("image", image)):
            if not isinstance(enc, QueryEncoder):
                raise TypeError(f"{name}: expected a QueryEncoder, got {type(enc).__name__}")
        if text.alpha != image.alpha:
            raise ValueError(f"text, image: expected the same alpha for both heads, got {text.alpha} and {image.alpha}")
        self.text, self.image = text, image
        self.eval()

    @property
    def alpha(self):
        return self.text.alpha

    @classmethod
    def untrained(cls, base: nn.Module, alpha: float | None) -> HeadEncoders:
        """Both heads equal to ``base`` (what stage 2 starts from)."""
        return cls(QueryEncoder(copy.deepcopy(base), 0, alpha), QueryEncoder(copy.deepcopy(base), 0, alpha))

    @torch.no_grad()
    def encode_images(self, images) -> dict:
        return {"text": self.text(images), "image": self.image(images)}

    def save(self, out_dir) -> Path:
        """Write both heads' encoders and ``heads.json`` as one directory (with its manifest), atomically."""

        def fill(tmp: Path) -> None:
            for name in HEAD_NAMES:
                save_encoder(getattr(self, name).learned, tmp / name)
            (tmp / HEADS_FILE).write_text(json.dumps({"alpha": self.alpha, "format": 1}) + "\n")

        return replace_dir_atomically(out_dir, fill)


def load_head_encoders(path, base: nn.Module, *, trust_remote_code: bool = False, device: str = "cpu") -> HeadEncoders:
    """The stage-2 query encoders in ``path`` (``HeadEncoders.save``), mixed with ``base`` (the index's
    encoder) as they were trained; the weights are checked to fit ``base``'s architecture."""
    p = Path(path).expanduser()
    if not (p / HEADS_FILE).is_file():
        raise ValueError(
            f"query_encoder: {p / HEADS_FILE} not found (expected the query_encoder folder that train-retriever writes)"
        )
    verify_dir(p)
    meta = json.loads((p / HEADS_FILE).read_text())
    heads = {}
    for name in HEAD_NAMES:
        trained = load_encoder(p / name, trust_remote_code=trust_remote_code, device=device)
        enc = QueryEncoder(copy.deepcopy(base), 0, meta.get("alpha"))
        try:
            enc.learned.load_state_dict(trained.state_dict())
        except RuntimeError as e:
            raise ValueError(
                f"query_encoder: {p / name} does not fit the index's encoder ({str(e).splitlines()[0]})"
            ) from None
        heads[name] = enc
    return HeadEncoders(**heads)
