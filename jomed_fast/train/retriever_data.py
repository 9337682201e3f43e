"""Stage 2's queries: the training (or evaluation) samples as the trainer reads them.

``QuerySet.from_samples(samples, task, name)``: single-label samples only (stage 2's target is the
gold class's log-probability); per query its gold class ``labels [N]``, its question and its score
cache key (:func:`.pair_scores.query_key`: the image's content and the question). Images are read
per batch (``Sample.image`` when in memory, else ``load_image()``), never all held.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from .pair_scores import query_key

__all__ = ["QuerySet"]


@dataclasses.dataclass
class QuerySet:
    """The query set: samples, questions (``None`` when no sample has one), gold classes ``[N]``,
    cache keys."""

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
        if task.is_multilabel or not task.has_label_set:
            raise ValueError(
                f"task: stage 2 needs a single-label task with a label set, got {task.name!r} "
                f"({task.kind}); multi-label gold answers need the answer-string scorer"
            )
        if len(samples) == 0:
            raise ValueError(f"{name}: expected at least one sample, got none")
        questions, labels = [], []
        for i, s in enumerate(samples):
            for attr in ("id", "answer", "image", "load_image"):
                if not hasattr(s, attr):
                    raise TypeError(f"{name}[{i}]: expected a jomed_fast.data.Sample, got {type(s).__name__}")
            questions.append(getattr(s, "question", None))
            label = s.label if s.label is not None else task.encode_answer(s.answer)
            if not isinstance(label, int):
                raise TypeError(f"{name}[{i}]: expected a single class index as label, got {label!r}")
            labels.append(label)
        qs = None if all(q is None for q in questions) else questions
        return cls(list(samples), qs, torch.tensor(labels, dtype=torch.long), [query_key(s) for s in samples])

    def __len__(self) -> int:
        return len(self.samples)
