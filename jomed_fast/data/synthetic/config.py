"""What the synthetic data depend on: the classes and their confusable looks, the random streams,
the generator's configuration and a case (:class:`Prototype`).

Every random draw comes from :func:`_rng` keyed by ``(seed, stream, item...)``, so any item can be
drawn alone; the stream ids below must never be renumbered (the data would change).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..._checks import check_int
from ...tasks.catalog import SYNTHETIC_NAMES

GENERATOR_VERSION = 2
SPLITS = ("train", "val", "test")
NUM_CLASSES = len(SYNTHETIC_NAMES)

NORMAL, CYST, FIBROADENOMA, CARCINOMA, CALCIFICATIONS = range(NUM_CLASSES)
ATYPICAL_LOOK = {
    NORMAL: CALCIFICATIONS,
    CYST: FIBROADENOMA,
    FIBROADENOMA: CYST,
    CARCINOMA: FIBROADENOMA,
    CALCIFICATIONS: NORMAL,
}
DISTRACTOR_MODALITIES = ("chest_xray", "fundus", "dermoscopy", "histology")

# Stream ids of the per-item random generators.
_S_PROTO, _S_SPLIT_ORDER, _S_SAMPLE, _S_INDEX_ORDER, _S_INDEX = 11, 12, 13, 14, 15
_SPLIT_STREAM = {"train": 0, "val": 1, "test": 2}


def _rng(*key: int) -> np.random.Generator:
    """The generator of one item: ``SeedSequence(key)``, independent of every other item's."""
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


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

        check_int("SyntheticConfig.seed", self.seed, 0)
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
        need(
            0 <= rf and 0 <= mf and rf + mf <= 1,
            f"relevant_fraction + misleading_fraction must be in [0, 1], got {rf} + {mf}",
        )
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

    def geometry(self) -> dict:
        """The keyword arguments :func:`~.render.render_ultrasound` takes as ``geom``."""
        return dict(
            cx=self.cx,
            cy=self.cy,
            radius=self.radius,
            aspect=self.aspect,
            tilt=self.tilt,
            harmonics=self.harmonics,
            dots=self.dots,
            bands=self.bands,
        )
