"""``load_encoder(path)`` / ``save_encoder(encoder, path)``: a retriever encoder in a local directory —
the in-code TinyCLIP (its ``config.json`` + ``model.safetensors``) or a Hugging Face CLIP-style
model (``HFCLIPEncoder``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .._files import replace_dir_atomically
from .._manifest import verify_dir
from .tiny_clip import TinyCLIP, TinyConfig

__all__ = ["load_encoder", "save_encoder"]


def load_encoder(path: str | os.PathLike, *, trust_remote_code: bool = False, device: str = "cpu"):
    """TinyCLIP when ``config.json`` holds TinyCLIP's fields, else ``HFCLIPEncoder`` (offline only)."""
    p = Path(path).expanduser()
    config = p / "config.json"
    if not config.is_file():
        raise ValueError(f"encoder: {config} not found (expected a TinyCLIP or CLIP model directory)")
    verify_dir(p)
    try:
        fields = set(json.loads(config.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"encoder: {config} is not valid JSON ({e})") from None
    if fields <= set(TinyConfig.__dataclass_fields__):
        return TinyCLIP.load(p).to(device)
    from .hf import HFCLIPEncoder

    return HFCLIPEncoder(p, trust_remote_code=trust_remote_code, device=device)


def save_encoder(encoder, out: str | os.PathLike) -> Path:
    """Write ``encoder`` so that :func:`load_encoder` reads it back (TinyCLIP or an HF CLIP-style encoder)."""
    out = Path(out)
    if hasattr(encoder, "save"):
        return encoder.save(out)

    def fill(tmp: Path) -> None:  # an HF CLIP-style encoder
        for part in (encoder.model, encoder.tokenizer, encoder.processor):
            part.save_pretrained(tmp)

    # through a temporary directory: atomic, and save_pretrained's 0600 weights get the umask's mode
    return replace_dir_atomically(out, fill)
