"""``load_encoder(path)`` / ``save_encoder(encoder, path)``: a retriever encoder in a local directory,
of any family ``model_dir.family_of`` tells apart: the in-code TinyCLIP, Hugging Face CLIP / SigLIP
(``HFCLIPEncoder``), remote-code models such as jina-clip-v1 (``RemoteCodeEncoder``, only with
``trust_remote_code=True``) and open_clip models such as BiomedCLIP (``OpenCLIPEncoder``)."""

from __future__ import annotations

import os
from pathlib import Path

from .._manifest import verify_dir
from .model_dir import family_of
from .tiny_clip import TinyCLIP

__all__ = ["load_encoder", "save_encoder"]


def load_encoder(path: str | os.PathLike, *, trust_remote_code: bool = False, device: str = "cpu"):
    """The encoder in ``path``, of the family its files name (offline only)."""
    p = Path(path).expanduser()
    family = family_of(p)
    verify_dir(p)
    if family == "tiny":
        return TinyCLIP.load(p).to(device)
    if family == "open_clip":
        from .open_clip_encoder import OpenCLIPEncoder

        return OpenCLIPEncoder(p, device=device)
    if family == "remote_code":
        from .remote_code import RemoteCodeEncoder

        return RemoteCodeEncoder(p, trust_remote_code=trust_remote_code, device=device)
    from .hf import HFCLIPEncoder

    return HFCLIPEncoder(p, trust_remote_code=trust_remote_code, device=device)


def save_encoder(encoder, out: str | os.PathLike) -> Path:
    """Write ``encoder`` in its library's own format so that :func:`load_encoder` reads it back."""
    if not callable(getattr(encoder, "save", None)):
        raise TypeError(f"encoder: expected a retriever with save(out_dir), got {type(encoder).__name__}")
    return encoder.save(Path(out))
