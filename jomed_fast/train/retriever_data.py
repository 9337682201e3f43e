"""Stage 2's queries: the training (or evaluation) samples as the trainer reads them.

``QuerySet.from_samples(samples, task, name)``: per query its gold answer — the class index
(``labels [N]`` long) for a single-label task, the gold label *set* as a multi-hot row (``labels
[N, C]`` bool) for a multi-label one (stage 2's target is then the reader's likelihood of that set,
:func:`.pair_scores.gold_log_likelihoods`) — its question and its score cache key
(:func:`.pair_scores.query_key`: the image's content and the question). Images are read per batch
(``Sample.image`` when in memory, else ``load_image()``), never all held.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from .pair_scores import query_key

__all__ = ["QuerySet"]


@dataclasses.dataclass
class QuerySet:
    """The query set: samples, questions (``None`` when no sample has one), gold classes ``[N]``
    (multi-label: gold sets as multi-hot rows ``[N, C]``), cache keys."""

    samples: list
    questions: list | None
    labels: torch.Tensor
    keys: list

    def images(self, idx: list[int]) -> list:
        return [s.image if s.image is not None else s.load_image() for s in (self.samples[i] for i in idx)]

    def questions_of(self, idx: list[int]) -> list | None:
        return None if self.questions is None else [self.questions[i] for i in idx]

    @classmethod
    def from_samples(cls, samples: Sequence, task, name: str) -> QuerySet:
        if not task.has_label_set:
            raise ValueError(f"task: stage 2 needs a task with a label set, got {task.name!r} ({task.kind})")
        if len(samples) == 0:
            raise ValueError(f"{name}: expected at least one sample, got none")
        questions, labels = [], []
        sets: list[torch.Tensor] = []
        for i, s in enumerate(samples):
            for attr in ("id", "answer", "image", "load_image"):
                if not hasattr(s, attr):
                    raise TypeError(f"{name}[{i}]: expected a jomed_fast.data.Sample, got {type(s).__name__}")
            questions.append(getattr(s, "question", None))
            label = s.label if s.label is not None else task.encode_answer(s.answer)
            if task.is_multilabel:
                sets.append(_multi_hot(label, task.num_classes, f"{name}[{i}]"))
                continue
            if not isinstance(label, int):
                raise TypeError(f"{name}[{i}]: expected a single class index as label, got {label!r}")
            labels.append(label)
        qs = None if all(q is None for q in questions) else questions
        gold = torch.stack(sets) if task.is_multilabel else torch.tensor(labels, dtype=torch.long)
        return cls(list(samples), qs, gold, [query_key(s) for s in samples])

    def __len__(self) -> int:
        return len(self.samples)


def _multi_hot(label, num_classes: int, name: str) -> torch.Tensor:
    """A gold label set (an iterable of class indices) as a bool row ``[C]``."""
    if isinstance(label, (int, str)) or not hasattr(label, "__iter__"):
        raise TypeError(f"{name}: expected a set of class indices as a multi-label label, got {label!r}")
    idx = [int(c) for c in label]
    if not idx or any(not 0 <= c < num_classes for c in idx):
        raise ValueError(f"{name}: expected a non-empty set of class indices in 0..{num_classes - 1}, got {label!r}")
    row = torch.zeros(num_classes, dtype=torch.bool)
    row[idx] = True
    return row
