r"""A deterministic synthetic medical-like task and retrieval index (``jomed_fast.data.synthetic``).

It is what the demo, the end-to-end tests and the benchmarks run on: small RGB "breast
ultrasound" images of five findings, question/answer samples for the ``synthetic`` task
(:func:`jomed_fast.tasks.get_task` ``("synthetic")``), and an index of (image, caption) records
built so that retrieval helps, and a better retriever helps more.

Generative model
================
Classes ``c`` in 0..4 (answers ``"0"``..``"4"``): normal tissue, simple cyst, fibroadenoma,
carcinoma, calcifications. Each class has an *appearance* ("look"):

======  =================  ==================================================================
look    finding            rendering
======  =================  ==================================================================
0       normal tissue      tissue bands only (plus a faint iso-echoic fat lobule)
1       simple cyst        round anechoic (very dark) region, sharp smooth wall, bright
                           posterior acoustic enhancement below it
2       fibroadenoma       oval hypoechoic mass, wider than tall, gently lobulated, smooth
3       carcinoma          irregular spiculated hypoechoic mass, taller than wide, echogenic
                           halo, dark posterior acoustic shadow below it
4       calcifications     a cluster of 5-9 punctate bright echogenic foci, no mass
======  =================  ==================================================================

**Prototypes (cases).** Each class has ``prototypes_per_class`` prototypes ``p``, drawn once from
``rng(seed, "prototype", c, p)``: a lesion geometry (centre, size, aspect, tilt, boundary
harmonics, calcification offsets) and the tissue-band pattern. With probability
``atypical_rate`` a prototype is *atypical*: it is rendered with the look of a confusable class
(``ATYPICAL_LOOK``: cyst->fibroadenoma, fibroadenoma->cyst, carcinoma->fibroadenoma (the
circumscribed carcinoma), normal->calcifications (benign echogenic artefacts),
calcifications->normal (too faint to see)) while its label stays ``c``. With ``atypical_cue``
``w > 0`` every rendering of an atypical case blends in ``w`` of its lesion as its own class would
render it (the faint posterior shadow and halo of a circumscribed carcinoma, the weaker
enhancement of a cyst-like fibroadenoma, ...): a subtle signature of the true class under the
confusable look, as real mimics have. A retriever that weighs it brings records of the right
diagnosis for atypical queries; a retriever that matches the gross look does not.

**Rendering.** ``x = render(prototype, jitter, visibility v, fresh speckle)``: position jitter
(``N(0, 0.025 S)`` px for image size ``S``), size jitter (x``N(1, 0.05)``), tissue-band phase
jitter; the lesion's contrast against tissue, its posterior effect and halo are scaled by
``v ~ U(visibility)``; multiplicative Rayleigh speckle (2x2 grains); depth attenuation; gain
jitter; grey replicated to RGB uint8. Renderings of one prototype are close in pixel space,
renderings of two prototypes of the same look are not.

**Samples.** ``train``/``val``/``test``: labels balanced (a seeded permutation of ``i mod C``),
a uniformly chosen prototype of the label's class, one rendering. Training samples come from the
first ``ceil(train_prototype_fraction * P)`` prototypes of each class, val/test samples from the
others: test cases are new to a reader trained on ``train`` (it cannot memorise them), while the
index covers every case. With probability ``label_noise`` the stored label is replaced by a
uniformly chosen other class (``meta.noisy``; ``meta.true_label`` keeps the truth). So from the
image alone a reader learns each look (far above the 20% chance) but mislabels atypical cases and
faint renderings (far below 100%; a nearest-centroid classifier on intensity quantiles + an 8x8
thumbnail scores about 0.4-0.5), while the top-1 caption of a case-level retriever (pixel L2 at
half resolution) is right about 90% of the time and a look-level one (8x8 thumbnails) about 70%.

**Index** (``index_size`` records; kinds shuffled by a seeded permutation, ids stable):

* *relevant* (``relevant_fraction``): a fresh rendering of prototype ``j mod P`` (round-robin over
  all prototypes, so each has the same number of records) whose caption names its class and
  findings in words ("breast ultrasound showing an irregular spiculated hypoechoic mass with
  posterior acoustic shadowing, consistent with carcinoma."; atypical prototypes: "... an oval
  circumscribed hypoechoic mass (atypical appearance); biopsy-proven carcinoma."). A retriever
  that matches *this case* (fine image similarity) brings the right diagnosis even for atypical
  prototypes; one that matches only the look brings the look's class. With probability
  ``hedged_rate`` a typical record's diagnosis is *hedged* as an impression ("..., possibly
  carcinoma.", "..., cannot exclude fibroadenoma."; ``meta.hedged``).
* *misleading* (``misleading_fraction``): the typical look of a class ``a`` with a fresh geometry
  that belongs to no prototype, captioned with another class ``b != a``'s findings and name, always
  hedged (an impression that biopsy did not confirm). A coarse (look-level) retriever brings them
  as readily as relevant ones; a case-level one does not. Hedged captions are right only part of
  the time, confirmed ones always: the wording tells a reader how far to trust a record, while
  the base retriever has no reason to care (the words say nothing about the image).
* *distractor* (the rest): other modalities (chest radiograph, fundus photograph, dermoscopy,
  histology) with unrelated captions.

Everything is a pure function of ``(config, item index)``: every sample and record is drawn from
its own ``numpy`` generator seeded by ``SeedSequence([seed, stream, index])``, so any slice of a
100k-record index can be rendered alone (``SyntheticGenerator.index_record(i)``), in any order,
in parallel, with identical results. The same seed gives identical bytes on disk; another seed
gives other data.

On disk (:func:`write_synthetic`; every file written atomically, ``manifest.json`` last)::

    out_dir/manifest.json                   config, counts, sha256 of each JSONL file
    out_dir/{train,val,test}.jsonl          {"id", "image_path", "answer", "meta"}
    out_dir/index.jsonl                     {"id", "image_path", "text", "meta"}
    out_dir/images/{train,val,test,index}/<id>.png

:func:`load_synthetic` reads them back through the JSONL loader (identical ids, answers, labels,
captions, metadata and pixels).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from ..tasks import Task, get_task
from ..tasks.catalog import SYNTHETIC_NAMES
from .errors import DataError
from .io import PathLike, atomic_write_json, sha256_file
from .records import IndexRecord, Sample, load_index_records, load_samples, write_index_records, write_samples

GENERATOR_VERSION = 2
SPLITS = ("train", "val", "test")
NUM_CLASSES = len(SYNTHETIC_NAMES)

NORMAL, CYST, FIBROADENOMA, CARCINOMA, CALCIFICATIONS = range(NUM_CLASSES)
ATYPICAL_LOOK = {NORMAL: CALCIFICATIONS, CYST: FIBROADENOMA, FIBROADENOMA: CYST, CARCINOMA: FIBROADENOMA,
                 CALCIFICATIONS: NORMAL}

# Stream ids of the per-item random generators.
_S_PROTO, _S_SPLIT_ORDER, _S_SAMPLE, _S_INDEX_ORDER, _S_INDEX = 11, 12, 13, 14, 15
_SPLIT_STREAM = {"train": 0, "val": 1, "test": 2}

# Diagnosis names as captions use them (they contain the class name of the task's legend).
DIAGNOSIS = {
    NORMAL: "normal breast tissue",
    CYST: "a simple cyst",
    FIBROADENOMA: "fibroadenoma",
    CARCINOMA: "carcinoma",
    CALCIFICATIONS: "calcifications",
}
# Words that name a class in a caption (tests check that relevant captions contain one).
CLASS_KEYWORDS = {
    NORMAL: ("normal breast tissue",),
    CYST: ("simple cyst",),
    FIBROADENOMA: ("fibroadenoma",),
    CARCINOMA: ("carcinoma",),
    CALCIFICATIONS: ("calcifications",),
}
# Findings in words, per look.
FINDINGS = {
    NORMAL: (
        "homogeneous fibroglandular tissue without a focal mass",
        "normal layered breast parenchyma with no focal lesion",
        "regular tissue planes and no discrete mass",
    ),
    CYST: (
        "a round anechoic lesion with a thin smooth wall and posterior acoustic enhancement",
        "a well-circumscribed anechoic round lesion with through-transmission",
        "an anechoic circumscribed round structure with posterior enhancement",
    ),
    FIBROADENOMA: (
        "an oval circumscribed hypoechoic mass, wider than tall, with gentle lobulation",
        "a smooth oval hypoechoic mass with parallel orientation",
        "a well-defined oval hypoechoic solid mass, wider than tall",
    ),
    CARCINOMA: (
        "an irregular spiculated hypoechoic mass, taller than wide, with posterior acoustic shadowing",
        "an irregular hypoechoic mass with angular spiculated margins and an echogenic halo",
        "a spiculated taller-than-wide hypoechoic mass casting a posterior shadow",
    ),
    CALCIFICATIONS: (
        "clustered punctate echogenic foci without a discrete mass",
        "a cluster of bright punctate echogenic foci",
        "grouped microcalcifications seen as punctate echogenic foci",
    ),
}
_MODALITY = ("breast ultrasound", "ultrasound image", "B-mode breast ultrasound", "sonogram of the breast")
_VERB = ("showing", "demonstrating", "revealing", "with")
# A report states its diagnosis firmly; an impression hedges it (``hedged_rate`` of the typical
# relevant records, and every misleading one): hedged statements are right only part of the time.
_DX = ("consistent with {}", "compatible with {}", "suggestive of {}", "in keeping with {}")
_DX_HEDGED = ("possibly {}", "cannot exclude {}", "differential includes {}", "equivocal for {}")

DISTRACTOR_MODALITIES = ("chest_xray", "fundus", "dermoscopy", "histology")
_DISTRACTOR_CAPTIONS = {
    "chest_xray": (
        "frontal chest radiograph with clear lung fields and a normal cardiac silhouette",
        "chest x-ray showing bilateral perihilar opacities",
        "posteroanterior chest film with a right lower lobe consolidation",
        "chest radiograph with a small left pleural effusion",
    ),
    "fundus": (
        "color fundus photograph with a healthy optic disc and macula",
        "fundus photograph showing scattered dot-blot hemorrhages",
        "retinal photograph with hard exudates near the fovea",
        "fundus image with an enlarged optic cup",
    ),
    "dermoscopy": (
        "dermoscopy of a symmetric melanocytic nevus with a regular pigment network",
        "dermoscopic image of a seborrheic keratosis with comedo-like openings",
        "dermoscopy showing a pink vascular lesion with lacunae",
        "dermoscopic view of a brown macule with a reticular pattern",
    ),
    "histology": (
        "H&E section of colonic mucosa with regular crypts",
        "histology of a lymph node with reactive follicles",
        "H&E stained liver section with mild steatosis",
        "photomicrograph of skeletal muscle fibers",
    ),
}


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticConfig:
    """Everything the data depend on. Same config -> identical data and identical files."""

    seed: int = 0
    image_size: int = 32
    n_train: int = 500
    n_val: int = 100
    n_test: int = 250
    index_size: int = 1000
    prototypes_per_class: int = 16
    train_prototype_fraction: float = 0.5
    atypical_rate: float = 0.3
    label_noise: float = 0.0
    visibility: tuple[float, float] = (0.5, 1.0)
    speckle: float = 0.3
    relevant_fraction: float = 0.5
    misleading_fraction: float = 0.15
    hedged_rate: float = 0.0
    atypical_cue: float = 0.0

    def __post_init__(self) -> None:
        def need(cond: bool, what: str) -> None:
            if not cond:
                raise ValueError(f"SyntheticConfig.{what}")

        need(isinstance(self.seed, int) and self.seed >= 0, f"seed: expected an int >= 0, got {self.seed!r}")
        need(16 <= self.image_size <= 512, f"image_size: expected 16..512, got {self.image_size}")
        for k in ("n_train", "n_val", "n_test", "index_size"):
            need(int(getattr(self, k)) >= 0, f"{k}: expected >= 0, got {getattr(self, k)}")
        need(self.prototypes_per_class >= 1, f"prototypes_per_class: expected >= 1, got {self.prototypes_per_class}")
        need(
            0.0 < self.train_prototype_fraction <= 1.0,
            f"train_prototype_fraction: expected in (0, 1], got {self.train_prototype_fraction}",
        )
        need(0.0 <= self.atypical_rate <= 1.0, f"atypical_rate: expected in [0, 1], got {self.atypical_rate}")
        need(0.0 <= self.label_noise <= 1.0, f"label_noise: expected in [0, 1], got {self.label_noise}")
        lo, hi = self.visibility
        need(0.0 < lo <= hi <= 1.0, f"visibility: expected 0 < lo <= hi <= 1, got {self.visibility}")
        need(0.0 <= self.hedged_rate <= 1.0, f"hedged_rate: expected in [0, 1], got {self.hedged_rate}")
        need(0.0 <= self.atypical_cue <= 1.0, f"atypical_cue: expected in [0, 1], got {self.atypical_cue}")
        need(0.0 <= self.speckle <= 1.0, f"speckle: expected in [0, 1], got {self.speckle}")
        rf, mf = self.relevant_fraction, self.misleading_fraction
        need(0 <= rf and 0 <= mf and rf + mf <= 1, f"relevant_fraction + misleading_fraction must be in [0, 1], got {rf} + {mf}")
        object.__setattr__(self, "visibility", (float(lo), float(hi)))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["visibility"] = list(self.visibility)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SyntheticConfig":
        d = dict(d)
        if "visibility" in d:
            d["visibility"] = tuple(d["visibility"])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"SyntheticConfig: unknown keys {sorted(unknown)}")
        return cls(**d)

    def split_size(self, split: str) -> int:
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}[split]


@dataclass(frozen=True)
class Prototype:
    """A case: its class, the look it is rendered with, and its geometry."""

    id: int
    label: int
    look: int
    atypical: bool
    cx: float
    cy: float
    radius: float
    aspect: float
    tilt: float
    harmonics: tuple[tuple[int, float, float], ...]  # (order k, amplitude, phase)
    dots: tuple[tuple[float, float], ...]  # calcification offsets in units of radius
    bands: tuple[tuple[float, float, float, float], ...]  # (cycles, amplitude, phase, slope)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


# ----------------------------------------------------------------------------------------------
# geometry and rendering
# ----------------------------------------------------------------------------------------------
def _make_geometry(rng: np.random.Generator, look: int, size: int, tissue_bands: Optional[tuple] = None) -> dict:
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
            (float(rng.uniform(1.0, 4.0)), float(rng.uniform(0.04, 0.1)), float(rng.uniform(0, 2 * math.pi)),
             float(rng.uniform(-0.25, 0.25)))
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
    geom: dict, look: int, visibility: float, size: int, rng: np.random.Generator, speckle: float, jitter: bool = True,
    cue_look: int | None = None, cue: float = 0.0,
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
            vessels += np.exp(-(d / (0.015 * s)) ** 2) * ((xx - ox) * math.cos(ang) + (yy - oy) * math.sin(ang) > 0)
        img = base + od[..., None] * np.array([0.15, 0.5, 0.5]) - 0.3 * np.clip(vessels, 0, 1)[..., None] * disc_mask[..., None]
    elif modality == "dermoscopy":
        skin = np.array([0.85, 0.65, 0.55]) + rng.uniform(-0.05, 0.05, 3)
        lesion = np.clip(_smooth_blobs(rng, size, 3, 0.08, 0.16), 0, 1)
        img = skin[None, None, :] * (1 - 0.6 * lesion[..., None]) + lesion[..., None] * np.array([0.25, 0.12, 0.05]) * 0.6
    else:  # histology
        pink = np.array([0.92, 0.7, 0.82])
        nuclei = np.clip(_smooth_blobs(rng, size, int(rng.integers(12, 25)), 0.02, 0.04), 0, 1)
        img = pink[None, None, :] * (1 - nuclei[..., None]) + nuclei[..., None] * np.array([0.35, 0.2, 0.6])
    img = np.clip(img + noise, 0, 1)
    return np.ascontiguousarray(np.round(img * 255).astype(np.uint8))


# ----------------------------------------------------------------------------------------------
# captions
# ----------------------------------------------------------------------------------------------
def caption_for(label: int, look: int, rng: np.random.Generator, hedged: bool = False) -> str:
    """A caption naming the findings of ``look`` and the diagnosis ``label`` (``hedged``: as an impression)."""
    mod = _MODALITY[int(rng.integers(len(_MODALITY)))]
    verb = _VERB[int(rng.integers(len(_VERB)))]
    finding = FINDINGS[look][int(rng.integers(len(FINDINGS[look])))]
    if hedged:
        dx = _DX_HEDGED[int(rng.integers(len(_DX_HEDGED)))].format(DIAGNOSIS[label])
        text = f"{mod} {verb} {finding}, {dx}."
    elif look == label:
        dx = _DX[int(rng.integers(len(_DX)))].format(DIAGNOSIS[label])
        text = f"{mod} {verb} {finding}, {dx}."
    else:
        text = f"{mod} {verb} {finding} (atypical appearance); biopsy-proven {DIAGNOSIS[label].removeprefix('a ')}."
    return text[0].upper() + text[1:]


def _misleading_caption(named: int, rng: np.random.Generator) -> str:
    return caption_for(named, named, rng, hedged=True)


# ----------------------------------------------------------------------------------------------
# the generator
# ----------------------------------------------------------------------------------------------
class SyntheticGenerator:
    """Renders any sample or index record of a :class:`SyntheticConfig` on demand."""

    def __init__(self, config: Optional[SyntheticConfig] = None, **overrides: Any):
        if config is None:
            config = SyntheticConfig(**overrides)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.task: Task = get_task("synthetic")
        if self.task.num_classes != NUM_CLASSES:
            raise RuntimeError("the 'synthetic' task and jomed_fast.data.synthetic disagree on the classes")
        self.prototypes: tuple[Prototype, ...] = tuple(self._make_prototypes())
        self._split_labels: dict[str, np.ndarray] = {}
        self._index_plan: Optional[tuple[np.ndarray, np.ndarray]] = None

    # -- prototypes -----------------------------------------------------------------------------
    def _make_prototypes(self) -> Iterator[Prototype]:
        cfg = self.config
        pid = 0
        for c in range(NUM_CLASSES):
            for p in range(cfg.prototypes_per_class):
                rng = _rng(cfg.seed, _S_PROTO, c, p)
                atypical = bool(rng.uniform() < cfg.atypical_rate)
                look = ATYPICAL_LOOK[c] if atypical else c
                g = _make_geometry(rng, look, cfg.image_size)
                yield Prototype(id=pid, label=c, look=look, atypical=atypical, **g)
                pid += 1

    def prototypes_of(self, label: int, split: Optional[str] = None) -> list[Prototype]:
        """The prototypes of class ``label``; with ``split``, those its samples are drawn from.

        The first ``ceil(train_prototype_fraction * P)`` prototypes of each class are the training
        cases; val/test samples come from the others (cases the reader has not seen, which the
        index still covers). With fraction 1 every split uses every prototype.
        """
        protos = [p for p in self.prototypes if p.label == label]
        if split is None:
            return protos
        k = self.n_train_prototypes
        if k >= len(protos):
            return protos
        return protos[:k] if split == "train" else protos[k:]

    @property
    def n_train_prototypes(self) -> int:
        cfg = self.config
        return max(1, math.ceil(cfg.train_prototype_fraction * cfg.prototypes_per_class))

    @staticmethod
    def _geom(p: Prototype) -> dict:
        return dict(cx=p.cx, cy=p.cy, radius=p.radius, aspect=p.aspect, tilt=p.tilt, harmonics=p.harmonics,
                    dots=p.dots, bands=p.bands)

    def _cue(self, p: Prototype) -> dict:
        """Rendering arguments that give an atypical case the faint signature of its class."""
        return {"cue_look": p.label, "cue": self.config.atypical_cue} if p.atypical else {}

    # -- samples --------------------------------------------------------------------------------
    def _labels(self, split: str) -> np.ndarray:
        if split not in self._split_labels:
            n = self.config.split_size(split)
            base = np.arange(n) % NUM_CLASSES
            perm = _rng(self.config.seed, _S_SPLIT_ORDER, _SPLIT_STREAM[split]).permutation(n)
            self._split_labels[split] = base[perm]
        return self._split_labels[split]

    def sample(self, split: str, i: int) -> Sample:
        """Sample ``i`` of ``split`` (``"syn-<split>-<i>"``)."""
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
        n = self.config.split_size(split)
        if not 0 <= i < n:
            raise IndexError(f"{split} sample {i} outside 0..{n - 1}")
        cfg = self.config
        true = int(self._labels(split)[i])
        rng = _rng(cfg.seed, _S_SAMPLE, _SPLIT_STREAM[split], i)
        protos = self.prototypes_of(true, split)
        proto = protos[int(rng.integers(len(protos)))]
        vis = round(float(rng.uniform(*cfg.visibility)), 4)
        image = render_ultrasound(self._geom(proto), proto.look, vis, cfg.image_size, rng, cfg.speckle,
                                  **self._cue(proto))
        label, noisy = true, False
        if cfg.label_noise > 0 and rng.uniform() < cfg.label_noise:
            label = int((true + 1 + rng.integers(NUM_CLASSES - 1)) % NUM_CLASSES)
            noisy = True
        meta = {
            "prototype": proto.id,
            "true_label": true,
            "look": proto.look,
            "atypical": proto.atypical,
            "visibility": vis,
            "noisy": noisy,
        }
        return Sample(
            id=f"syn-{split}-{i:06d}",
            image_path=None,
            answer=self.task.format_answer(label),
            label=label,
            question=None,
            image=image,
            extra={"meta": meta},
        )

    def samples(self, split: str) -> list[Sample]:
        return [self.sample(split, i) for i in range(self.config.split_size(split))]

    # -- index ----------------------------------------------------------------------------------
    KINDS = ("relevant", "misleading", "distractor")

    def _plan(self) -> tuple[np.ndarray, np.ndarray]:
        """(kind code per record, rank of the record within its kind)."""
        if self._index_plan is None:
            cfg = self.config
            n = cfg.index_size
            n_rel = int(round(n * cfg.relevant_fraction))
            n_mis = min(n - n_rel, int(round(n * cfg.misleading_fraction)))
            kinds = np.concatenate([np.zeros(n_rel, np.int8), np.ones(n_mis, np.int8), np.full(n - n_rel - n_mis, 2, np.int8)])
            kinds = kinds[_rng(cfg.seed, _S_INDEX_ORDER).permutation(n)]
            rank = np.zeros(n, np.int64)
            for k in range(3):
                m = kinds == k
                rank[m] = np.arange(int(m.sum()))
            self._index_plan = (kinds, rank)
        return self._index_plan

    def index_kind(self, i: int) -> str:
        return self.KINDS[int(self._plan()[0][i])]

    def index_record(self, i: int) -> IndexRecord:
        """Index record ``i`` (``"syn-idx-<i>"``), rendered on its own."""
        cfg = self.config
        if not 0 <= i < cfg.index_size:
            raise IndexError(f"index record {i} outside 0..{cfg.index_size - 1}")
        kinds, rank = self._plan()
        kind = self.KINDS[int(kinds[i])]
        rng = _rng(cfg.seed, _S_INDEX, i)
        size = cfg.image_size
        if kind == "relevant":
            proto = self.prototypes[int(rank[i]) % len(self.prototypes)]
            vis = float(rng.uniform(*cfg.visibility))
            image = render_ultrasound(self._geom(proto), proto.look, vis, size, rng, cfg.speckle, **self._cue(proto))
            # drawn only when hedging is on: with hedged_rate 0 the random draws are version 1's
            hedged = bool(cfg.hedged_rate > 0 and rng.uniform() < cfg.hedged_rate and not proto.atypical)
            text = caption_for(proto.label, proto.look, rng, hedged=hedged)
            meta = {"kind": kind, "label": proto.label, "look": proto.look, "prototype": proto.id,
                    "modality": "ultrasound", "hedged": hedged}
        elif kind == "misleading":
            look = int(rank[i]) % NUM_CLASSES
            named = int((look + 1 + rng.integers(NUM_CLASSES - 1)) % NUM_CLASSES)
            geom = _make_geometry(rng, look, size)
            vis = float(rng.uniform(*cfg.visibility))
            image = render_ultrasound(geom, look, vis, size, rng, cfg.speckle, jitter=False)
            text = _misleading_caption(named, rng)
            meta = {"kind": kind, "label": named, "look": look, "prototype": None, "modality": "ultrasound",
                    "hedged": True}
        else:
            modality = DISTRACTOR_MODALITIES[int(rank[i]) % len(DISTRACTOR_MODALITIES)]
            image = render_distractor(modality, rng, size)
            caps = _DISTRACTOR_CAPTIONS[modality]
            text = caps[int(rng.integers(len(caps)))]
            text = text[0].upper() + text[1:] + "."
            meta = {"kind": kind, "label": None, "look": None, "prototype": None, "modality": modality}
        return IndexRecord(id=f"syn-idx-{i:07d}", image_path=None, text=text, image=image, extra={"meta": meta})

    def index_records(self, start: int = 0, stop: Optional[int] = None) -> list[IndexRecord]:
        stop = self.config.index_size if stop is None else min(stop, self.config.index_size)
        return [self.index_record(i) for i in range(start, stop)]

    def generate(self) -> "SyntheticDataset":
        return SyntheticDataset(
            config=self.config,
            task=self.task,
            train=self.samples("train"),
            val=self.samples("val"),
            test=self.samples("test"),
            index=self.index_records(),
        )


@dataclass(eq=False)
class SyntheticDataset:
    config: SyntheticConfig
    task: Task
    train: list
    val: list
    test: list
    index: list

    def split(self, name: str) -> list:
        if name not in (*SPLITS, "index"):
            raise ValueError(f"split: expected one of {(*SPLITS, 'index')}, got {name!r}")
        return getattr(self, name)


def generate(config: Optional[SyntheticConfig] = None, **overrides: Any) -> SyntheticDataset:
    """All splits and the index of ``config`` (keyword overrides build/replace the config)."""
    return SyntheticGenerator(config, **overrides).generate()


# ----------------------------------------------------------------------------------------------
# disk
# ----------------------------------------------------------------------------------------------
MANIFEST = "manifest.json"


def write_synthetic(dataset: SyntheticDataset, out_dir: PathLike) -> Path:
    """Write ``dataset`` as JSONL + PNG under ``out_dir`` (atomic files; manifest last)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = out / MANIFEST
    if stale.exists():
        stale.unlink()  # an interrupted rewrite must not look complete
    files = {}
    for split in SPLITS:
        p = out / f"{split}.jsonl"
        write_samples(dataset.split(split), p, images_dir=out / "images" / split)
        files[p.name] = sha256_file(p)
    p = out / "index.jsonl"
    write_index_records(dataset.index, p, images_dir=out / "images" / "index")
    files[p.name] = sha256_file(p)
    manifest = {
        "generator": "jomed_fast.data.synthetic",
        "version": GENERATOR_VERSION,
        "task": dataset.task.name,
        "config": dataset.config.to_dict(),
        "counts": {s: len(dataset.split(s)) for s in (*SPLITS, "index")},
        "files": files,
    }
    atomic_write_json(out / MANIFEST, manifest)
    return out


def load_synthetic(out_dir: PathLike, *, load_images: bool = True, verify: bool = True) -> SyntheticDataset:
    """Read a folder written by :func:`write_synthetic` (checks the manifest and checksums)."""
    out = Path(out_dir)
    mpath = out / MANIFEST
    if not mpath.exists():
        raise DataError(mpath, "missing manifest: not a complete synthetic dataset folder (interrupted write?)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        config = SyntheticConfig.from_dict(manifest["config"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(mpath, f"bad manifest ({type(e).__name__}: {e})") from None
    if verify:
        for name, digest in manifest.get("files", {}).items():
            p = out / name
            if not p.exists():
                raise DataError(p, "listed in the manifest but missing")
            if sha256_file(p) != digest:
                raise DataError(p, "checksum differs from the manifest (file changed or corrupt)")
    task = get_task(manifest.get("task", "synthetic"))
    mode = "decode" if load_images else "open"
    splits = {
        s: list(load_samples(out / f"{s}.jsonl", task, load_images=load_images, verify_images=mode)) for s in SPLITS
    }
    index = list(load_index_records(out / "index.jsonl", load_images=load_images, verify_images=mode))
    for name, recs in (*splits.items(), ("index", index)):
        want = manifest.get("counts", {}).get(name)
        if want is not None and want != len(recs):
            raise DataError(out / f"{name}.jsonl", f"has {len(recs)} records, the manifest says {want}")
    return SyntheticDataset(config=config, task=task, index=index, **splits)


def images_array(records: Sequence[Any]) -> np.ndarray:
    """``[n, H, W, 3]`` uint8 stack of the records' images (loading them when needed)."""
    return np.stack([r.load_image() for r in records])
