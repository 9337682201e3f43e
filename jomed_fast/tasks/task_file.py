"""A task from a YAML file (``--task-file task.yaml``): the fields of :class:`~.spec.Task`, read
with ``yaml.safe_load`` and checked before the Task's own validation::

    name: chest_findings
    kind: multilabel                  # binary | multiclass | multilabel | vqa_closed | vqa_open
    labels: ["0", "1", "2"]           # the answers the reader writes, in class order
    label_names: [normal, effusion, nodule]
    question: Which findings does this chest X-ray show?
    legend: paper                     # instructions = the paper's label legend over label_names

Every field of ``Task`` may be given (``instructions`` as text, or ``legend: paper`` to build the
paper's ``"Provide answer according to the labels: ..."`` legend from ``label_names``; not both);
``name``, ``kind``, ``labels`` (but for ``vqa_open``) and ``question`` (null when every sample brings
its own) are required. The Task built is the same value, and so has the same ``identity``, as one
built in Python from the same fields.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .catalog import paper_legend
from .spec import Task

__all__ = ["load_task_file", "LEGENDS"]

LEGENDS = ("paper",)
_FIELDS = {f.name: f for f in dataclasses.fields(Task)}
_REQUIRED = ("name", "kind", "question")
_LISTS = {"labels": str, "label_names": str, "source_label_map": int}


def _fail(path: Path, what: str) -> ValueError:
    return ValueError(f"--task-file {path}: {what}")


def _typed(path: Path, key: str, value):
    """``value`` of field ``key`` as the Task field takes it, or a ValueError naming it."""
    if key in _LISTS:
        item = _LISTS[key]
        if value is None and key == "source_label_map":
            return None
        if not isinstance(value, list) or not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            raise _fail(path, f"{key}: expected a list of {item.__name__}, got {value!r}")
        return tuple(value)
    if key == "question":
        if value is not None and not isinstance(value, str):
            raise _fail(path, f"question: expected a str or null, got {value!r}")
        return value
    if not isinstance(value, str):
        raise _fail(path, f"{key}: expected a str, got {value!r}")
    return value


def load_task_file(path) -> Task:
    """The :class:`Task` that the YAML file ``path`` describes (module docstring); a missing file,
    bad YAML, an unknown or missing field, a wrong type or a Task that does not validate is a
    ValueError naming the file and the field."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise _fail(p, "not found")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise _fail(p, f"not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(raw, dict):
        raise _fail(p, f"expected a mapping of Task fields, got {type(raw).__name__}")
    known = set(_FIELDS) | {"legend"}
    unknown = sorted(str(k) for k in raw if k not in known)
    if unknown:
        raise _fail(p, f"unknown field {unknown[0]!r} (fields: {', '.join(sorted(known))})")
    missing = [k for k in _REQUIRED if k not in raw]
    if raw.get("kind") != "vqa_open" and "labels" not in raw:
        missing.append("labels")
    if missing:
        raise _fail(p, f"missing field {missing[0]!r}")
    fields = {k: _typed(p, k, v) for k, v in raw.items() if k != "legend"}
    legend = raw.get("legend")
    if legend is not None:
        if legend not in LEGENDS:
            raise _fail(p, f"legend: expected one of {LEGENDS}, got {legend!r}")
        if "instructions" in fields:
            raise _fail(p, "legend and instructions: give one (the legend writes the instructions)")
        if not fields.get("label_names"):
            raise _fail(p, "legend: needs label_names (the legend lists them)")
        fields["instructions"] = paper_legend(fields["label_names"])
    try:
        return Task(**fields)
    except (ValueError, TypeError) as e:
        raise _fail(p, str(e)) from None
