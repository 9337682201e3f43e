r"""Retrieval-only baselines: answer a query with the labels of its retrieved index records, no reader.

Two baselines, both computed from stored predictions (no model is run):

* ``knn_vote`` (:func:`knn_vote_records`): a k-nearest-neighbour majority vote over the labels of
  the *base* (un-fine-tuned) retriever's top-k index records. The base retriever's retrieval is
  read from one system's prediction file, the system predicted with the base retriever (in the
  paper's pipeline fine-tuned RAG: stage 1 keeps the retriever frozen), through its candidates'
  record ids. That is the simplest correct design: the neighbours are the ones the reader saw,
  and nothing is re-embedded. ``k`` defaults to 4, the paper's r = 4 candidates (2 per head in the
  authors' code); a system with fewer candidates than ``k`` for some query is refused (rerun
  ``predict`` with larger ``--k-text`` / ``--k-image``).
* ``candidate_vote`` (:func:`candidate_vote_records`): the same vote over all of each system's
  own candidates (JOMED's fine-tuned retriever brings other records than the base one).

Ranking. Retrieval scores compare within a head only (:mod:`.rerankers`), so the candidates are
ranked by :math:`\pi_k`, each head's retrieval softmax over its own candidates
(:func:`.rerankers.within_head_probabilities`, temperature 1), ties in stored order; the top
``k`` vote.

Vote. Single-label: the label the most voters carry; a tie goes to the tied label whose best
voter ranks highest (the nearest neighbour among them), so the result does not depend on class
numbering. Multi-label, per label: label :math:`l` is predicted when at least half of the voters
carry it, :math:`|\{j : l \in y_j\}| / k \ge 0.5` (a set vote can never tie). A record labelled
``null`` (an index record of no class: another modality, an unrelated caption) abstains; the
shares are taken over the voters that do not. A query whose voters all abstain gets the *index
prior*: the answer the same vote gives over every labelled record of the index.

Index record labels (:func:`index_labels`): the record's ``label`` key (a class index, a list of
indices for multi-label, or ``null``), else its ``answer`` key (answer text, read by the task's
``encode_answer``), else the synthetic generator's ``meta.label`` (a class index or ``null``). A
voter whose record carries none of them, or whose id is not among the records, is an error naming
it. Open VQA has no label set and no baseline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from .._checks import is_int
from .prediction_records import PredictionRecord
from .rerankers import within_head_probabilities

__all__ = [
    "DEFAULT_K",
    "candidate_vote_records",
    "index_labels",
    "index_prior",
    "knn_vote_records",
    "ranked_candidates",
    "retrieval_baselines",
    "retrieved",
    "vote",
]

DEFAULT_K = 4
NO_LABEL = None  # a record of no class: it abstains
_MISSING = object()


def _class_index(value: Any, num_classes: int, where: str) -> int:
    if not is_int(value) or not 0 <= int(value) < num_classes:
        raise ValueError(f"{where}: expected a class index in 0..{num_classes - 1}, got {value!r}")
    return int(value)


def _label_of(extra: Mapping, task, where: str) -> Any:
    """The label of one index record's extra keys (see the module docstring), or ``_MISSING``."""
    if "label" in extra:
        raw = extra["label"]
        if raw is None:
            return NO_LABEL
        if task.is_multilabel:
            if not isinstance(raw, list):
                raise ValueError(f"{where}: 'label' expected a list of class indices, got {raw!r}")
            return frozenset(_class_index(v, task.num_classes, f"{where}: 'label'") for v in raw)
        return _class_index(raw, task.num_classes, f"{where}: 'label'")
    if extra.get("answer") is not None:
        try:
            return task.encode_answer(extra["answer"])
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: 'answer' {e}") from None
    meta = extra.get("meta")
    if isinstance(meta, Mapping) and "label" in meta:
        raw = meta["label"]
        if raw is None:
            return NO_LABEL
        if task.is_multilabel:
            return frozenset(_class_index(v, task.num_classes, f"{where}: 'meta.label'") for v in raw)
        return _class_index(raw, task.num_classes, f"{where}: 'meta.label'")
    return _MISSING


def index_labels(records: Sequence, task, source: str = "index records") -> dict[str, Any]:
    """``{record id: label}`` of index records (``data.IndexRecord``: their ``extra`` keys) for a
    task with a label set: a class index, a frozenset for multi-label, or ``None`` (no class).
    Records without any label key are left out (a vote that needs one is refused then)."""
    if not task.has_label_set:
        raise ValueError(f"--task: {task.name} has no label set; the retrieval baselines vote over class labels")
    out: dict[str, Any] = {}
    for r in records:
        label = _label_of(r.extra, task, f"{source}: record {r.id!r}")
        if label is not _MISSING:
            out[r.id] = label
    return out


def ranked_candidates(rec: PredictionRecord) -> list[int]:
    """The candidate positions by decreasing within-head retrieval probability, ties in stored order."""
    if not rec.candidates:
        return []
    pi = within_head_probabilities(rec)
    return sorted(range(len(pi)), key=lambda k: -pi[k])


def vote(labels: Sequence[Any], multilabel: bool) -> Any:
    """The vote of ``labels`` in rank order (nearest first; ``None`` abstains), or ``None`` when
    every voter abstains. Single-label: the most frequent label, a tie to the one whose first
    voter ranks highest. Multi-label: the sorted list of labels carried by at least half of the
    voters."""
    voters = [y for y in labels if y is not None]
    if not voters:
        return None
    if multilabel:
        counts: dict[int, int] = {}
        for y in voters:
            for c in y:
                counts[c] = counts.get(c, 0) + 1
        return sorted(c for c, n in counts.items() if 2 * n >= len(voters))
    tally: dict[Any, int] = {}
    first: dict[Any, int] = {}
    for rank, y in enumerate(voters):
        tally[y] = tally.get(y, 0) + 1
        first.setdefault(y, rank)
    return min(tally, key=lambda y: (-tally[y], first[y]))


def index_prior(labels: Mapping[str, Any], multilabel: bool) -> Any:
    """The vote of every labelled index record (in id order): a query whose voters all abstain."""
    prior = vote([labels[i] for i in sorted(labels)], multilabel)
    if prior is None:
        raise ValueError(
            "index records: no record carries a class label (all unlabelled or null); the baselines have none to vote"
        )
    return prior


def _vote_record(rec: PredictionRecord, positions: Sequence[int], labels: Mapping[str, Any], prior: Any):
    voters = []
    for k in positions:
        rid = rec.candidates[k].id
        if rid not in labels:
            raise ValueError(
                f"index records: candidate {rid!r} of query {rec.query_id!r} has no label (not among the "
                "records, or without a 'label', 'answer' or 'meta.label' key); give the --index-records "
                "the candidates came from, with their labels"
            )
        voters.append(labels[rid])
    answer = vote(voters, rec.kind == "multilabel")
    return dataclasses.replace(rec, candidates=[], fused=prior if answer is None else answer, fused_probs=None)


NO_RETRIEVAL_HEAD = "none"  # predict's placeholder candidate of a run without retrieval


def retrieved(records: Sequence[PredictionRecord]) -> bool:
    """Every query has candidates from the index (not a run without retrieval, whose one
    placeholder candidate has head ``"none"``)."""
    return bool(records) and all(
        r.candidates and all(c.head != NO_RETRIEVAL_HEAD for c in r.candidates) for r in records
    )


def _check_kind(records: Sequence[PredictionRecord]) -> None:
    if any(r.kind == "vqa_open" for r in records):
        raise ValueError("records: open VQA answers have no label set to vote over")
    if not retrieved(records):
        raise ValueError(
            "records: a run without retrieval has no index records to vote (predicted with --retrieval none)"
        )


def knn_vote_records(
    base: Sequence[PredictionRecord], labels: Mapping[str, Any], k: int = DEFAULT_K
) -> list[PredictionRecord]:
    """Copies of ``base`` (the base retriever's system) answered by the kNN vote of their top-``k``
    candidates' record labels (the module docstring); no candidates or probabilities kept."""
    if not is_int(k) or k < 1:
        raise ValueError(f"--knn-k: expected an int >= 1, got {k!r}")
    _check_kind(base)
    prior = index_prior(labels, any(r.kind == "multilabel" for r in base))
    out = []
    for r in base:
        if len(r.candidates) < k:
            raise ValueError(
                f"--knn-k: {k} neighbours asked, but query {r.query_id!r} has {len(r.candidates)} candidates; "
                "lower --knn-k or predict with more candidates (--k-text, --k-image)"
            )
        out.append(_vote_record(r, ranked_candidates(r)[:k], labels, prior))
    return out


def candidate_vote_records(records: Sequence[PredictionRecord], labels: Mapping[str, Any]) -> list[PredictionRecord]:
    """Copies of ``records`` answered by the vote of all of their own candidates' record labels."""
    _check_kind(records)
    prior = index_prior(labels, any(r.kind == "multilabel" for r in records))
    out = []
    for r in records:
        out.append(_vote_record(r, ranked_candidates(r), labels, prior))
    return out


def retrieval_baselines(
    systems: Mapping[str, Sequence[PredictionRecord]],
    labels: Mapping[str, Any],
    knn_from: str,
    k: int = DEFAULT_K,
) -> dict[str, list[PredictionRecord]]:
    """The baseline rows by name: ``knn<k>_vote`` over ``systems[knn_from]`` (the base retriever's
    system), then ``<system>_candidate_vote`` for every system whose queries all have candidates
    (a run without retrieval has nothing to vote)."""
    if knn_from not in systems:
        raise ValueError(f"knn_from: expected one of {sorted(systems)}, got {knn_from!r}")
    out = {f"knn{k}_vote": knn_vote_records(systems[knn_from], labels, k)}
    for name, recs in systems.items():
        if retrieved(recs):
            out[f"{name}_candidate_vote"] = candidate_vote_records(recs, labels)
    clash = sorted(set(out) & set(systems))
    if clash:
        raise ValueError(f"systems: the names {clash} are the baselines' rows; name the systems otherwise")
    return out
