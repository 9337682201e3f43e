"""A seeded, stratified share of a task's samples moved into index records with report-style
captions: the index of a retrieval experiment built from labelled data, disjoint from the samples.

For each class (a label set for a multi-label task) with :math:`n_c` samples, ``round(f · n_c)``
of them, drawn by a generator seeded with ``seed``, become index records; the rest stay samples. A
record's caption is ``template`` with ``{label}`` replaced by the class's name (its label name, or
the label; a set's names joined by ", "), and it carries the sample's canonical ``answer``, which
the retrieval-only baselines read (``analysis.baselines``). Record ids are the samples' with
``index/`` before them, so a query is never its own record by id; the images are the same files,
so the leave-self-out rule (``exclude_self``) would drop them by content if they met again.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

import numpy as np

from ..tasks import Task
from .records import IndexRecord, Sample

__all__ = ["DEFAULT_CAPTION", "check_caption_template", "split_index_records"]

DEFAULT_CAPTION = "Findings consistent with {label}."


def check_caption_template(template: str) -> str:
    """``template`` when it names ``{label}`` and no other field; else a ValueError saying so."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"--caption-template: {e} in {template!r}") from None
    if fields.count("label") < 1 or set(fields) != {"label"}:
        raise ValueError(f"--caption-template: expected '{{label}}' and no other field, got {template!r}")
    return template


def _class_key(sample: Sample, task: Task):
    if task.is_multilabel:
        return tuple(sorted(sample.label))
    return int(sample.label)


def _caption(key, task: Task, template: str) -> str:
    names = task.label_names or task.labels
    classes = key if isinstance(key, tuple) else (key,)
    return template.format(label=", ".join(names[c] for c in classes))


def split_index_records(
    samples: Sequence[Sample], task: Task, fraction: float, seed: int, template: str = DEFAULT_CAPTION
) -> tuple[list[Sample], list[IndexRecord]]:
    """``(samples kept, index records)`` (module docstring), both in the input's order."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--index-fraction: expected a share in (0, 1), got {fraction}")
    check_caption_template(template)
    if not task.has_label_set:
        raise ValueError(f"--task: {task.name!r} has no label set; index captions name a sample's class")
    by_class: dict = {}
    for i, s in enumerate(samples):
        if s.label is None:
            raise ValueError(f"samples: {s.id!r} has no label of task {task.name!r}")
        by_class.setdefault(_class_key(s, task), []).append(i)
    rng = np.random.default_rng(seed)
    chosen: set[int] = set()
    for key in sorted(by_class):
        members = by_class[key]
        take = int(round(fraction * len(members)))
        chosen.update(int(members[j]) for j in rng.permutation(len(members))[:take])
    kept = [s for i, s in enumerate(samples) if i not in chosen]
    records = [
        IndexRecord(
            id=f"index/{s.id}",
            image_path=s.image_path,
            text=_caption(_class_key(s, task), task, template),
            image=s.image,
            extra={"answer": s.answer},
        )
        for i, s in enumerate(samples)
        if i in chosen
    ]
    return kept, records
