"""Atomic file writes and image I/O: any image file -> RGB uint8 numpy arrays; PNG out."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Union

import numpy as np

# re-exported: the data layer writes through them as data.io.*
from jomed_fast._files import atomic_write_bytes, atomic_write_text, sha256_file  # noqa: F401

PathLike = Union[str, os.PathLike]


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


# PIL modes whose pixels do not fit 8 bits: 16-bit unsigned (any byte order), 32-bit int, 32-bit float
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def high_bit_to_uint8(pixels: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    r"""A high-bit-depth grey image ``[H, W]`` (any int or float dtype) -> ``[H, W]`` uint8.

    Without ``window``, the image's own range maps onto 0..255:
    :math:`u = \mathrm{round}(255\,(v - v_{min}) / (v_{max} - v_{min}))` over its finite values, so
    no value is clipped: whatever the bit depth, the darkest pixel becomes 0 and the brightest 255
    (an image of one value, which has no contrast to keep, maps to 0). NaN and -inf map to 0, +inf to 255.
    ``window=(lo, hi)`` (``lo < hi``, in the image's own units, e.g. a CT window in HU) maps lo..hi
    onto 0..255 instead; values outside the window saturate at 0 / 255, as a viewer's window does.
    """
    v = np.asarray(pixels, dtype=np.float64)
    finite = np.isfinite(v)
    if window is not None:
        lo, hi = _check_window(window)
    elif finite.any():
        lo, hi = float(v[finite].min()), float(v[finite].max())
    else:
        lo = hi = 0.0
    if hi > lo:
        u = (np.where(finite, v, 0.0) - lo) * (255.0 / (hi - lo))
    else:
        u = np.zeros_like(v)
    u = np.where(np.isnan(v), 0.0, np.where(np.isposinf(v), 255.0, np.where(np.isneginf(v), 0.0, u)))
    return np.clip(np.rint(u), 0, 255).astype(np.uint8)  # the clip only acts inside a window's saturation


def _check_window(window) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in window)
    except (TypeError, ValueError):
        raise ValueError(f"window: expected (low, high) numbers, got {window!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ValueError(f"window: expected finite low < high, got {window!r}")
    return lo, hi


def _pil_to_rgb(im, window: tuple[float, float] | None = None) -> np.ndarray:
    """A PIL image of any mode -> ``[H, W, 3]`` uint8: high-bit grey modes by :func:`high_bit_to_uint8`
    (PIL's own ``convert("RGB")`` clips them at 255: a 16-bit image comes out white), the others by
    PIL's conversion (palette, grey + alpha, CMYK, YCbCr, LAB, bilevel; alpha is dropped)."""
    if im.mode in HIGH_BIT_MODES:
        grey = high_bit_to_uint8(np.asarray(im), window)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if window is not None:
        raise ValueError(
            f"window: applies to high-bit-depth images (modes {', '.join(HIGH_BIT_MODES)}), "
            f"got an image of mode {im.mode!r}"
        )
    if im.mode == "La":  # premultiplied alpha: PIL converts it to RGB only through LA
        im = im.convert("LA")
    return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))


def as_rgb_uint8(image: Any, *, name: str = "image") -> np.ndarray:
    """A PIL image (any mode, see :func:`load_image`) or an ``[H, W]`` / ``[H, W, 1|3|4]`` uint8
    array -> ``[H, W, 3]`` uint8 (C-contiguous)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        Image = None  # type: ignore[assignment]
    if Image is not None and isinstance(image, Image.Image):
        return _pil_to_rgb(image)
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


def load_image(path: PathLike, *, window: tuple[float, float] | None = None) -> np.ndarray:
    """Decode an image file to ``[H, W, 3]`` uint8 RGB.

    8-bit files of any mode (grey, palette, grey + alpha, RGBA, CMYK, YCbCr, ...) are converted by
    PIL. High-bit-depth grey files (16-bit PNG and TIFF, 32-bit int or float TIFF: PIL modes
    ``I;16*``, ``I``, ``F``) are scaled to 8 bits by their own min..max, never clipped, or by
    ``window=(low, high)`` when given (see :func:`high_bit_to_uint8`). A truncated or corrupt
    file raises ``OSError`` (PIL's error).
    """
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return _pil_to_rgb(im, window)


def check_image(path: PathLike, mode: str = "open") -> None:
    """Raise ``OSError``/``ValueError`` when ``path`` is not a readable image.

    ``mode``: ``"exists"`` (a regular file), ``"open"`` (PIL identifies the format from the
    header: cheap; a truncated file passes), ``"decode"`` (everything :func:`load_image` does:
    catches truncated and half-written files and modes that cannot be converted).
    """
    from PIL import Image

    if mode not in ("exists", "open", "decode"):
        raise ValueError(f"verify_images: expected 'none', 'exists', 'open' or 'decode', got {mode!r}")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"image file not found: {p}")
    if not p.is_file():
        raise OSError(f"image path is not a file: {p}")
    if mode == "exists":
        return
    if mode == "decode":
        load_image(p)
        return
    with Image.open(p):
        pass
