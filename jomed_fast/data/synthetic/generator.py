"""The generator: prototypes (cases), the balanced question/answer splits, and the index of
relevant, misleading and distractor records, each item rendered on demand from its own seed."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, Optional

import numpy as np

from ...tasks import Task, get_task
from ..records import IndexRecord, Sample
from .captions import _misleading_caption, caption_for, distractor_caption
from .config import (
    _S_INDEX,
    _S_INDEX_ORDER,
    _S_PROTO,
    _S_SAMPLE,
    _S_SPLIT_ORDER,
    _SPLIT_STREAM,
    ATYPICAL_LOOK,
    DISTRACTOR_MODALITIES,
    NUM_CLASSES,
    SPLITS,
    Prototype,
    SyntheticConfig,
    _rng,
)
from .dataset import SyntheticDataset
from .render import _make_geometry, render_distractor, render_ultrasound


class SyntheticGenerator:
    """Renders any sample or index record of a :class:`SyntheticConfig` on demand."""

    KINDS = ("relevant", "misleading", "distractor")

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
        return p.geometry()

    def _cue(self, p: Prototype) -> dict:
        """Rendering arguments that give an atypical case the faint signature of its class."""
        return {"cue_look": p.label, "cue": self.config.atypical_cue} if p.atypical else {}

    def _render_case(self, proto: Prototype, visibility: float, rng: np.random.Generator) -> np.ndarray:
        cfg = self.config
        return render_ultrasound(
            proto.geometry(), proto.look, visibility, cfg.image_size, rng, cfg.speckle, **self._cue(proto)
        )

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
        image = self._render_case(proto, vis, rng)
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
    def _plan(self) -> tuple[np.ndarray, np.ndarray]:
        """(kind code per record, rank of the record within its kind)."""
        if self._index_plan is None:
            cfg = self.config
            n = cfg.index_size
            n_rel = int(round(n * cfg.relevant_fraction))
            n_mis = min(n - n_rel, int(round(n * cfg.misleading_fraction)))
            kinds = np.concatenate(
                [np.zeros(n_rel, np.int8), np.ones(n_mis, np.int8), np.full(n - n_rel - n_mis, 2, np.int8)]
            )
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
        make = {"relevant": self._relevant, "misleading": self._misleading, "distractor": self._distractor}[kind]
        image, text, meta = make(int(rank[i]), _rng(cfg.seed, _S_INDEX, i))
        return IndexRecord(
            id=f"syn-idx-{i:07d}", image_path=None, text=text, image=image, extra={"meta": {"kind": kind, **meta}}
        )

    def _relevant(self, rank: int, rng: np.random.Generator) -> tuple[np.ndarray, str, dict]:
        """A fresh rendering of prototype ``rank mod P``, captioned with its class and findings."""
        cfg = self.config
        proto = self.prototypes[rank % len(self.prototypes)]
        image = self._render_case(proto, float(rng.uniform(*cfg.visibility)), rng)
        # drawn only when hedging is on: with hedged_rate 0 the random draws are version 1's
        hedged = bool(cfg.hedged_rate > 0 and rng.uniform() < cfg.hedged_rate and not proto.atypical)
        text = caption_for(proto.label, proto.look, rng, hedged=hedged)
        return (
            image,
            text,
            {
                "label": proto.label,
                "look": proto.look,
                "prototype": proto.id,
                "modality": "ultrasound",
                "hedged": hedged,
            },
        )

    def _misleading(self, rank: int, rng: np.random.Generator) -> tuple[np.ndarray, str, dict]:
        """The typical look ``rank mod C`` on a geometry of no prototype, captioned as another class."""
        cfg = self.config
        look = rank % NUM_CLASSES
        named = int((look + 1 + rng.integers(NUM_CLASSES - 1)) % NUM_CLASSES)
        geom = _make_geometry(rng, look, cfg.image_size)
        vis = float(rng.uniform(*cfg.visibility))
        image = render_ultrasound(geom, look, vis, cfg.image_size, rng, cfg.speckle, jitter=False)
        return (
            image,
            _misleading_caption(named, rng),
            {"label": named, "look": look, "prototype": None, "modality": "ultrasound", "hedged": True},
        )

    def _distractor(self, rank: int, rng: np.random.Generator) -> tuple[np.ndarray, str, dict]:
        """An image of another modality (round-robin over them) with an unrelated caption."""
        modality = DISTRACTOR_MODALITIES[rank % len(DISTRACTOR_MODALITIES)]
        image = render_distractor(modality, rng, self.config.image_size)
        return (
            image,
            distractor_caption(modality, rng),
            {"label": None, "look": None, "prototype": None, "modality": modality},
        )

    def index_records(self, start: int = 0, stop: Optional[int] = None) -> list[IndexRecord]:
        stop = self.config.index_size if stop is None else min(stop, self.config.index_size)
        return [self.index_record(i) for i in range(start, stop)]

    def generate(self) -> SyntheticDataset:
        return SyntheticDataset(
            config=self.config,
            task=self.task,
            train=self.samples("train"),
            val=self.samples("val"),
            test=self.samples("test"),
            index=self.index_records(),
        )


def generate(config: Optional[SyntheticConfig] = None, **overrides: Any) -> SyntheticDataset:
    """All splits and the index of ``config`` (keyword overrides build/replace the config)."""
    return SyntheticGenerator(config, **overrides).generate()
