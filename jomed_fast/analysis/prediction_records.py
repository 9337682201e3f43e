"""Prediction record format: one JSON object per query (JSONL)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from jomed_fast._files import atomic_write_via
from jomed_fast.tasks import KINDS


@dataclass
class Candidate:
    id: str
    head: str  # "text" / "image" / ...
    score: float  # retrieval score s_k
    probs: list[float] = field(default_factory=list)  # per-candidate class probabilities [C]
    prediction: Any = None  # int class, list of ints (multilabel) or str (open)


@dataclass
class PredictionRecord:
    query_id: str
    gold: Any  # int, list of ints, or str
    kind: str
    candidates: list[Candidate]
    fused: Any = None
    fused_probs: list[float] | None = None  # the fused class distribution [C], when there is one

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {self.kind!r}")
        self.candidates = [c if isinstance(c, Candidate) else Candidate(**c) for c in self.candidates]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PredictionRecord:
        return cls(**d)


def write_jsonl(path: str, records: Iterable[PredictionRecord]) -> None:
    """Atomic write (temp file + rename; the mode a plain ``open(path, "w")`` would give)."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            for r in records:
                f.write(json.dumps(r.to_dict()) + "\n")

    atomic_write_via(path, write)


def read_jsonl(path: str) -> list[PredictionRecord]:
    with open(path) as f:
        return [PredictionRecord.from_dict(json.loads(line)) for line in f if line.strip()]
