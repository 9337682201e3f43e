"""Which retriever family a local model directory holds, read off its files.

| files | family |
|---|---|
| ``config.json`` with only TinyCLIP's fields | ``tiny`` (``TinyCLIP``) |
| ``open_clip_config.json`` | ``open_clip`` (BiomedCLIP's hub layout) |
| ``config.json`` whose ``auto_map`` names an ``AutoModel`` | ``remote_code`` (jina-clip-v1) |
| ``config.json`` with ``model_type`` clip / siglip | ``hf`` |
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["FAMILIES", "read_config", "family_of"]

FAMILIES = ("tiny", "open_clip", "remote_code", "hf")
OPEN_CLIP_CONFIG = "open_clip_config.json"


def read_config(path: Path, name: str = "config.json") -> dict:
    file = path / name
    if not file.is_file():
        raise ValueError(
            f"encoder: {file} not found (expected a TinyCLIP, CLIP, SigLIP, open_clip or remote-code model directory)"
        )
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"encoder: {file} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"encoder: {file} expected a JSON object, got {type(config).__name__}")
    return config


def family_of(path: Path) -> str:
    """One of ``FAMILIES`` for the directory ``path`` (see the module docstring)."""
    from .hf import HF_FAMILIES
    from .tiny_clip import TinyConfig

    if (path / OPEN_CLIP_CONFIG).is_file():
        return "open_clip"
    config = read_config(path)
    if set(config) <= set(TinyConfig.__dataclass_fields__):
        return "tiny"
    if "AutoModel" in (config.get("auto_map") or {}):
        return "remote_code"
    if config.get("model_type") in HF_FAMILIES:
        return "hf"
    raise ValueError(
        f"encoder: {path / 'config.json'} has model_type {config.get('model_type')!r} and no auto_map AutoModel, "
        f"expected a TinyCLIP config, model_type {' / '.join(HF_FAMILIES)}, or remote code (with --trust-remote-code)"
    )
