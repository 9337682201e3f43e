"""Geometry and rendering: a lesion's shape drawn per look, the grey ultrasound-like image of a case,
and the unrelated images of other modalities (the index's distractors).

Each function draws from the ``rng`` it is given, in a fixed order: the same generator state gives
the same pixels, and a change of draw order changes the data (see ``GENERATOR_VERSION``).
Images are ``[S, S, 3]`` uint8 (grey replicated to RGB for ultrasound).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import numpy as np

from .config import CALCIFICATIONS, CARCINOMA, CYST, FIBROADENOMA, NORMAL


def _make_geometry(rng: np.random.Generator, look: int, size: int, tissue_bands: Optional[tuple] = None) -> dict:
    """A lesion geometry of ``look`` at image size ``size`` and its tissue bands (drawn unless
    ``tissue_bands`` is given): the geometry fields of :class:`~.config.Prototype`."""
    s = float(size)
    if look == CYST:
        aspect = rng.uniform(0.9, 1.12)
        harm = [(k, rng.uniform(0.0, 0.02), rng.uniform(0, 2 * math.pi)) for k in (2, 3)]
        radius = rng.uniform(0.14, 0.2) * s
    elif look == FIBROADENOMA:
        aspect = rng.uniform(1.5, 1.9)
        harm = [(k, rng.uniform(0.02, 0.06), rng.uniform(0, 2 * math.pi)) for k in (2, 3, 4)]
        radius = rng.uniform(0.15, 0.21) * s
    elif look == CARCINOMA:
        aspect = rng.uniform(0.62, 0.82)
        ks = sorted(rng.choice(np.arange(5, 10), size=3, replace=False).tolist())
        harm = [(int(k), rng.uniform(0.1, 0.2), rng.uniform(0, 2 * math.pi)) for k in ks]
        radius = rng.uniform(0.15, 0.21) * s
    elif look == CALCIFICATIONS:
        aspect = 1.0
        harm = []
        radius = rng.uniform(0.12, 0.18) * s
    else:  # NORMAL: a faint fat lobule gives the case its own structure
        aspect = rng.uniform(1.3, 2.2)
        harm = [(k, rng.uniform(0.0, 0.05), rng.uniform(0, 2 * math.pi)) for k in (2, 3)]
        radius = rng.uniform(0.12, 0.2) * s
    n_dots = int(rng.integers(5, 10))
    ang = rng.uniform(0, 2 * math.pi, n_dots)
    rad = np.sqrt(rng.uniform(0.0, 1.0, n_dots))
    dots = tuple((float(r * math.cos(a)), float(r * math.sin(a))) for r, a in zip(rad, ang))
    if tissue_bands is None:
        tissue_bands = tuple(
            (
                float(rng.uniform(1.0, 4.0)),
                float(rng.uniform(0.04, 0.1)),
                float(rng.uniform(0, 2 * math.pi)),
                float(rng.uniform(-0.25, 0.25)),
            )
            for _ in range(2)
        )
    return dict(
        cx=float(rng.uniform(0.25, 0.75) * s),
        cy=float(rng.uniform(0.25, 0.58) * s),
        radius=float(radius),
        aspect=float(aspect),
        tilt=float(rng.uniform(-0.25, 0.25)),
        harmonics=tuple((int(k), float(a), float(p)) for k, a, p in harm),
        dots=dots,
        bands=tissue_bands,
    )


JITTER_POS, JITTER_SCALE, JITTER_BAND = 0.025, 0.05, 0.1

_LOOK_PARAMS = {
    # interior intensity, posterior effect, halo, edge sharpness
    NORMAL: (0.38, 0.0, 0.0, 4.0),
    CYST: (0.04, 0.30, 0.0, 14.0),
    FIBROADENOMA: (0.16, 0.05, 0.0, 10.0),
    CARCINOMA: (0.16, -0.32, 0.14, 6.0),
    CALCIFICATIONS: (None, 0.0, 0.0, 0.0),
}


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _speckle(rng: np.random.Generator, size: int, strength: float) -> np.ndarray:
    """Multiplicative speckle, mean 1: a Rayleigh field averaged over 2x2 grains."""
    g = rng.standard_normal((2, size + 1, size + 1))
    ray = np.hypot(g[0], g[1]) * (1.0 / math.sqrt(math.pi / 2))  # Rayleigh, mean 1
    ray = (ray[:-1, :-1] + ray[1:, :-1] + ray[:-1, 1:] + ray[1:, 1:]) * 0.25
    return 1.0 + (2.0 * strength) * (ray - 1.0)


def _lesion(geom: dict, look: int, tissue: np.ndarray, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """What the lesion of ``look`` adds to ``tissue`` at full visibility (``[S, S]``, linear in it)."""
    s = float(size)
    yy, xx = _grid(size)
    interior, posterior, halo, sharp = _LOOK_PARAMS[look]
    delta = np.zeros((size, size))
    if look == CALCIFICATIONS:
        for ox, oy in geom["dots"]:
            px, py = cx + ox * r, cy + oy * r
            d2 = (xx - px) ** 2 + (yy - py) ** 2
            delta = delta + 0.9 * np.exp(-d2 / (2 * 0.7**2))
        return delta
    a = r * math.sqrt(geom["aspect"])
    b = r / math.sqrt(geom["aspect"])
    ct, st = math.cos(geom["tilt"]), math.sin(geom["tilt"])
    u = ((xx - cx) * ct + (yy - cy) * st) / a
    w = (-(xx - cx) * st + (yy - cy) * ct) / b
    rho = np.sqrt(u**2 + w**2)
    phi = np.arctan2(w, u)
    boundary = np.ones_like(rho)
    for k, amp, ph in geom["harmonics"]:
        boundary = boundary + amp * np.cos(k * phi + ph)
    inside = 1.0 / (1.0 + np.exp(-(boundary - rho) * sharp))
    target = interior if look != NORMAL else 0.9 * tissue
    delta = inside * (target - tissue)
    if halo:
        delta = delta + halo * np.exp(-(((rho - boundary) / 0.18) ** 2)) * (rho > boundary * 0.9)
    if posterior:
        below = np.clip((yy - cy) / max(b, 1.0), 0.0, None)
        column = np.exp(-(((xx - cx) / (0.9 * a)) ** 2))
        fade = np.clip(below, 0.0, 1.0) * np.exp(-np.clip(yy - cy - b, 0.0, None) / (0.6 * s))
        delta = delta + posterior * column * fade * (1.0 - inside)
    return delta


def render_ultrasound(
    geom: dict,
    look: int,
    visibility: float,
    size: int,
    rng: np.random.Generator,
    speckle: float,
    jitter: bool = True,
    cue_look: int | None = None,
    cue: float = 0.0,
) -> np.ndarray:
    """One grey ultrasound-like rendering of ``geom`` with ``look``; ``[S, S, 3]`` uint8.

    ``cue_look``/``cue``: blend ``cue`` of the lesion as ``cue_look`` renders it into the lesion
    (an atypical case's faint signature of its true class)."""
    s = float(size)
    yy, xx = _grid(size)
    if jitter:
        dx, dy = rng.normal(0.0, JITTER_POS * s, 2)
        scale = float(np.clip(rng.normal(1.0, JITTER_SCALE), 0.8, 1.2))
        band_jit = rng.normal(0.0, JITTER_BAND, len(geom["bands"]))
        gain = float(rng.uniform(0.9, 1.1))
    else:
        dx = dy = 0.0
        scale, band_jit, gain = 1.0, np.zeros(len(geom["bands"])), 1.0
    cx, cy = geom["cx"] + dx, geom["cy"] + dy
    r = geom["radius"] * scale
    # tissue: layered bands with depth attenuation
    tissue = np.full((size, size), 0.46)
    for (cyc, amp, ph, slope), j in zip(geom["bands"], band_jit):
        tissue = tissue * (1.0 + amp * np.sin(2 * math.pi * cyc * (yy + slope * xx) / s + ph + j))
    tissue = tissue * (1.0 - 0.3 * yy / s)
    v = float(visibility)
    lesion = _lesion(geom, look, tissue, cx, cy, r, size)
    img = tissue + v * lesion
    if cue_look is not None and cue:
        # the faint signature of the true class on an atypical case's look: the same geometry
        # rendered with the class's own look, blended in with weight ``cue``
        img = img + cue * v * (_lesion(geom, cue_look, tissue, cx, cy, r, size) - lesion)
    img = img * _speckle(rng, size, speckle) * gain
    grey = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))


def _smooth_blobs(rng, size, n, r_lo, r_hi):
    yy, xx = _grid(size)
    out = np.zeros((size, size))
    for _ in range(n):
        cx, cy = rng.uniform(0, size, 2)
        rr = rng.uniform(r_lo, r_hi) * size
        out += np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * rr**2)))
    return out


def render_distractor(modality: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """An unrelated image of another modality; ``[S, S, 3]`` uint8."""
    s = float(size)
    yy, xx = _grid(size)
    noise = rng.normal(0.0, 0.03, (size, size, 3))
    if modality == "chest_xray":
        body = np.full((size, size), 0.75)
        for side in (-1, 1):
            lx = s / 2 + side * s * rng.uniform(0.18, 0.24)
            lung = np.exp(-((((xx - lx) / (0.17 * s)) ** 2 + ((yy - 0.5 * s) / (0.3 * s)) ** 2) ** 2))
            body = body - 0.55 * lung
        ribs = 0.06 * np.sin(2 * math.pi * yy / (s / rng.uniform(5, 8)))
        grey = np.clip(body + ribs, 0, 1)
        img = np.repeat(grey[:, :, None], 3, axis=2)
    elif modality == "fundus":
        rr = np.sqrt((xx - s / 2) ** 2 + (yy - s / 2) ** 2)
        disc_mask = (rr < 0.47 * s).astype(float)
        base = np.stack([0.85 * disc_mask, 0.35 * disc_mask, 0.12 * disc_mask], -1)
        ox, oy = s / 2 + rng.uniform(-0.25, 0.25) * s, s / 2 + rng.uniform(-0.1, 0.1) * s
        od = np.exp(-(((xx - ox) ** 2 + (yy - oy) ** 2) / (2 * (0.07 * s) ** 2)))
        vessels = np.zeros((size, size))
        for _ in range(4):
            ang = rng.uniform(0, 2 * math.pi)
            d = np.abs(-(xx - ox) * math.sin(ang) + (yy - oy) * math.cos(ang))
            vessels += np.exp(-((d / (0.015 * s)) ** 2)) * ((xx - ox) * math.cos(ang) + (yy - oy) * math.sin(ang) > 0)
        img = (
            base
            + od[..., None] * np.array([0.15, 0.5, 0.5])
            - 0.3 * np.clip(vessels, 0, 1)[..., None] * disc_mask[..., None]
        )
    elif modality == "dermoscopy":
        skin = np.array([0.85, 0.65, 0.55]) + rng.uniform(-0.05, 0.05, 3)
        lesion = np.clip(_smooth_blobs(rng, size, 3, 0.08, 0.16), 0, 1)
        img = (
            skin[None, None, :] * (1 - 0.6 * lesion[..., None]) + lesion[..., None] * np.array([0.25, 0.12, 0.05]) * 0.6
        )
    else:  # histology
        pink = np.array([0.92, 0.7, 0.82])
        nuclei = np.clip(_smooth_blobs(rng, size, int(rng.integers(12, 25)), 0.02, 0.04), 0, 1)
        img = pink[None, None, :] * (1 - nuclei[..., None]) + nuclei[..., None] * np.array([0.35, 0.2, 0.6])
    img = np.clip(img + noise, 0, 1)
    return np.ascontiguousarray(np.round(img * 255).astype(np.uint8))
