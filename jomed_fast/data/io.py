"""Atomic file writes and PNG image I/O (RGB uint8 numpy arrays)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Union

import numpy as np

from jomed_fast._files import make_temp_file
from jomed_fast._files import sha256_file  # noqa: F401  (re-exported: data.io.sha256_file)

PathLike = Union[str, os.PathLike]


def atomic_write_bytes(path: PathLike, data: bytes, *, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    A reader never sees a partial file; a killed writer leaves at most a ``.tmp`` file behind.
    ``fsync`` also flushes to disk before the rename (for power-loss safety of small manifests).
    The file gets the mode a plain ``open(path, "wb")`` would (``0o666 & ~umask``; see ``_files``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = make_temp_file(path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: PathLike, text: str, *, fsync: bool = False) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_jsonl(path: PathLike, rows: Iterable[dict], *, fsync: bool = True) -> int:
    """Write one JSON object per line (UTF-8, keys in insertion order); returns the row count."""
    buf = io.StringIO()
    n = 0
    for row in rows:
        buf.write(json.dumps(row, ensure_ascii=False))
        buf.write("\n")
        n += 1
    atomic_write_text(path, buf.getvalue(), fsync=fsync)
    return n


def atomic_write_json(path: PathLike, obj: Any, *, fsync: bool = True) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n", fsync=fsync)




def as_rgb_uint8(image: Any, *, name: str = "image") -> np.ndarray:
    """A PIL image or an ``[H, W]`` / ``[H, W, 1|3|4]`` array -> ``[H, W, 3]`` uint8 (C-contiguous)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        Image = None  # type: ignore[assignment]
    if Image is not None and isinstance(image, Image.Image):
        return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"{name}: expected uint8 pixels, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    elif not (arr.ndim == 3 and arr.shape[2] == 3):
        raise ValueError(f"{name}: expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got shape {arr.shape}")
    return np.ascontiguousarray(arr)


def encode_png(image: Any) -> bytes:
    """Deterministic PNG bytes of an RGB image (same pixels -> same bytes; no timestamps)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(as_rgb_uint8(image), mode="RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def save_png(path: PathLike, image: Any) -> None:
    atomic_write_bytes(path, encode_png(image))


def load_image(path: PathLike) -> np.ndarray:
    """Decode an image file to ``[H, W, 3]`` uint8 RGB (grey and RGBA are converted)."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))


def check_image(path: PathLike, mode: str = "open") -> None:
    """Raise ``OSError``/``ValueError`` when ``path`` is not a readable image.

    ``mode``: ``"exists"`` (a regular file), ``"open"`` (PIL identifies the format from the
    header: cheap), ``"decode"`` (full decode: also catches truncated files).
    """
    from PIL import Image

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"image file not found: {p}")
    if not p.is_file():
        raise OSError(f"image path is not a file: {p}")
    if mode == "exists":
        return
    with Image.open(p) as im:
        if mode == "decode":
            im.load()
        elif mode != "open":
            raise ValueError(f"verify_images: expected 'none', 'exists', 'open' or 'decode', got {mode!r}")
