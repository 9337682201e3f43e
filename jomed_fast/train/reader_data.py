r"""Stage 1's data: (sample, candidate) examples, class balancing, the frozen retrieval.

* **Examples.** With retrieval, each of the S training samples gets its K = ``k_text + k_image``
  candidates from the frozen retriever (text head first, then image head, as
  :meth:`jomed_fast.candidate_retrieval.Retrieval.search`), retrieved once at the start (deterministic), and
  every (sample, candidate) pair is its own example: ``S * K`` examples
  ``[retrieved image] background: {caption} [query image] {legend}{question} -> answer``
  (``paper`` layout). Without retrieval (the "reader only" baseline) each sample is one example
  with the plain query prompt (``candidate=None``).
* **Class balancing** (optional, the reference's): every class is truncated to the minority
  class's count :math:`m = \min_c |S_c|` by a seeded random subset of each class (kept in data order).
* **Order.** The examples' order is the trainers' one (:class:`.data_order.DataOrder`: the
  permutation of epoch e a pure function of the seed and e).
* **Encoding.** A micro-batch of examples goes through :func:`jomed_fast.prompts.build_messages`
  (layout, task legend and question, candidate) and the reader's processor
  (``encode_batch(..., answers=...)``: chat template, image placeholders expanded, right padding,
  ``labels`` ``-100`` except on the answer and end-of-turn tokens). The answer is the task's
  canonical text for the sample's label (``task.format_answer(label)``; the sample's ``answer`` when
  it has no label, e.g. open VQA).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..prompts import Candidate, as_image, build_messages

__all__ = ["Example", "ExampleSet", "balanced_indices", "retrieve_candidates"]


@dataclass(frozen=True)
class Example:
    """One training prompt: sample ``sample`` with its candidate ``candidate`` (-1: no candidate)."""

    sample: int
    candidate: int


def _label_of(sample: Any, name: str) -> Any:
    label = getattr(sample, "label", None)
    if label is None:
        raise ValueError(f"{name}: class balancing needs a class label on every sample, got label None")
    if isinstance(label, (frozenset, set, list, tuple)):
        raise TypeError(f"{name}: class balancing needs single-label samples, got the label set {sorted(label)}")
    return int(label)


def balanced_indices(samples: Sequence[Any], seed: int) -> list[int]:
    """Indices (ascending) of a class-balanced subset: each class truncated to the minority count,
    a random subset per class drawn with ``torch.Generator().manual_seed(seed)``."""
    if not samples:
        raise ValueError("train_samples: expected at least one sample, got none")
    by_class: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        by_class.setdefault(_label_of(s, f"train_samples[{i}]"), []).append(i)
    m = min(len(v) for v in by_class.values())
    gen = torch.Generator().manual_seed(int(seed))
    kept: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        pick = torch.randperm(len(members), generator=gen)[:m].tolist()
        kept.extend(members[j] for j in pick)
    return sorted(kept)


def _query_embeddings(retriever, images: list, batch_size: int) -> torch.Tensor:
    """``[S, D]`` query embeddings from the frozen retriever (``retrieval_queries`` when it has one,
    as ``QueryEncoder``, else ``encode_images``), in eval mode without gradients."""
    encode = getattr(retriever, "retrieval_queries", None) or getattr(retriever, "encode_images", None)
    if encode is None:
        raise TypeError(
            f"retriever: expected an encoder with encode_images (or retrieval_queries), got {type(retriever).__name__}"
        )
    was_training = getattr(retriever, "training", False)
    if hasattr(retriever, "eval"):
        retriever.eval()
    try:
        with torch.no_grad():
            parts = [
                encode(images[i : i + batch_size]).detach().float().cpu() for i in range(0, len(images), batch_size)
            ]
    finally:
        if was_training:
            retriever.train()
    return torch.cat(parts)


def retrieve_candidates(
    samples: Sequence[Any], retrieval, retriever, k_text: int, k_image: int, batch_size: int = 64
) -> tuple[list[list[Candidate]], torch.Tensor, torch.Tensor]:
    """Each sample's K candidates (text head first, then image head), their index rows ``[S, K]``
    and how many index rows were left out as the sample itself ``[S]`` (the retrieval's
    ``exclude_self`` / ``near_duplicate``)."""
    if not samples:
        return [], torch.zeros(0, k_text + k_image, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    images = [s.load_image() for s in samples]
    q = _query_embeddings(retriever, images, batch_size)
    found = retrieval.search(q, k_text=k_text, k_image=k_image, queries=samples)
    return found.candidates, found.ids, found.excluded


class ExampleSet:
    """The examples of one split and how to encode them.

    Args:
        samples: the split's samples (``load_image()``, ``label``, ``answer``, ``question``).
        task: the task (legend, question, canonical answers).
        layout: prompt layout.
        candidates: per sample, its candidates (``None``: reader only, one example per sample).
    """

    def __init__(
        self, samples: Sequence[Any], task, layout: str, candidates: Sequence[Sequence[Candidate]] | None = None
    ):
        self.samples = list(samples)
        self.task = task
        self.layout = layout
        self.candidates = None if candidates is None else [list(c) for c in candidates]
        if self.candidates is not None and len(self.candidates) != len(self.samples):
            raise ValueError(
                f"candidates: expected one list per sample ({len(self.samples)}), got {len(self.candidates)}"
            )
        if self.candidates is None:
            self.examples = [Example(i, -1) for i in range(len(self.samples))]
        else:
            self.examples = [Example(i, k) for i, c in enumerate(self.candidates) for k in range(len(c))]
        self._answers = [self._answer(s, i) for i, s in enumerate(self.samples)]

    def __len__(self) -> int:
        return len(self.examples)

    def _answer(self, sample: Any, i: int) -> str:
        label = getattr(sample, "label", None)
        if label is not None and self.task.has_label_set:
            return self.task.format_answer(label)
        answer = getattr(sample, "answer", None)
        if not isinstance(answer, str) or not answer:
            raise ValueError(f"samples[{i}]: expected a label or a non-empty answer string, got {answer!r}")
        return answer

    def label(self, j: int) -> int:
        """The class index of example ``j``'s sample."""
        return int(self.samples[self.examples[j].sample].label)

    def prompt(self, j: int) -> tuple[list[Any], list[dict], str]:
        """``(images, messages, answer)`` of example ``j``."""
        ex = self.examples[j]
        sample = self.samples[ex.sample]
        cand = None
        if ex.candidate >= 0:
            assert self.candidates is not None  # examples name a candidate only when candidates were given
            cand = self.candidates[ex.sample][ex.candidate]
        if cand is not None and cand.image is not None:
            cand = Candidate(as_image(cand.image, "candidate.image"), cand.text, cand.id)
        query = as_image(sample.load_image(), f"samples[{ex.sample}].image")
        messages, images = build_messages(self.layout, self.task, query, getattr(sample, "question", None), cand)
        return images, messages, self._answers[ex.sample]

    def encode(self, reader, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """A padded micro-batch of examples ``indices`` on the reader's device, with ``labels``."""
        prompts = [self.prompt(int(j)) for j in indices]
        return reader.encode_batch([(imgs, msgs) for imgs, msgs, _ in prompts], answers=[a for _, _, a in prompts])

    def batches(self, batch_size: int) -> list[list[int]]:
        """Consecutive micro-batches over every example, in order (validation)."""
        return [list(range(i, min(i + batch_size, len(self)))) for i in range(0, len(self), batch_size)]
