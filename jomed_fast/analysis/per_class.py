r"""Per-class F1 of the fused predictions, the numbers behind macro-F1, per system.

For class c over the records' fused answers (single-label: the class; multi-label: each label of
the answer set, one indicator column per label):

.. math::
    F_1^{(c)} = \frac{2\,TP_c}{2\,TP_c + FP_c + FN_c}, \qquad n_c = TP_c + FN_c \ \text{(support)}

A class that is neither a gold answer nor predicted has no F1 (``None``: drawn as missing, not as
zero); macro-F1 (``eval.metrics``) counts it as 0, so the mean of this table with ``None`` as 0 is
the macro-F1 the other tables report. Open VQA has no classes and no table.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from .._checks import is_int
from .prediction_records import PredictionRecord

__all__ = ["per_class_f1", "write_per_class_f1"]


def _indicators(values: Sequence, num_classes: int, name: str) -> np.ndarray:
    """``[N, C]`` booleans: row i marks the class (or the label set) of ``values[i]``."""
    m = np.zeros((len(values), num_classes), dtype=bool)
    for i, v in enumerate(values):
        if v is None:  # no answer could be read: no class predicted
            continue
        labels = [v] if _is_class_index(v) else list(v)
        for c in labels:
            if not _is_class_index(c) or not 0 <= int(c) < num_classes:
                raise ValueError(f"{name}[{i}]: expected class indices in 0..{num_classes - 1}, got {v!r}")
            m[i, int(c)] = True
    return m


def per_class_f1(records: Sequence[PredictionRecord], num_classes: int) -> dict:
    """``{"f1": [C] (None where undefined), "support": [C]}`` of the records' fused answers."""
    if not records:
        raise ValueError("records: expected at least one prediction record, got 0")
    if any(r.kind == "vqa_open" for r in records):
        raise ValueError("records: open VQA answers have no classes to score per class")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes: expected an int >= 1, got {num_classes!r}")
    pred = _indicators([r.fused for r in records], num_classes, "fused")
    gold = _indicators([r.gold for r in records], num_classes, "gold")
    tp, fp, fn = (pred & gold).sum(0), (pred & ~gold).sum(0), (~pred & gold).sum(0)
    denom = 2 * tp + fp + fn
    f1 = [float(2 * t / d) if d else None for t, d in zip(tp, denom)]
    return {"f1": f1, "support": [int(s) for s in tp + fn]}


def write_per_class_f1(
    out_dir: str | os.PathLike,
    systems: Mapping[str, Sequence[PredictionRecord]],
    num_classes: int,
    class_names: Sequence[str] | None = None,
    plot: bool = True,
) -> dict:
    """``per_class_f1.json`` / ``.md`` / ``.png``: ``{system: {class name: F1}}``, the classes'
    support (gold counts, the same for every system: they answer the same queries) in the chart's
    groups, and the class order (``classes``: the JSON sorts its keys); returns
    ``{"table", "support"}``."""
    from .consistency import check_same_queries, write_analysis

    names = list(class_names) if class_names is not None else [f"class {c}" for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"class_names: expected {num_classes} names, got {len(names)}")
    if len(set(names)) != len(names):
        raise ValueError(f"class_names: expected distinct names, got {names}")
    check_same_queries(systems)
    table, support = {}, None
    for system, recs in systems.items():
        scores = per_class_f1(recs, num_classes)
        table[system] = dict(zip(names, scores["f1"]))
        support = dict(zip(names, scores["support"]))
    write_analysis(
        str(out_dir),
        "per_class_f1",
        table,
        extra={"support": support, "classes": names},
        plot=plot,
        title="F1 per class of the fused answer",
        ylabel="F1 (%)",
        column_n=support,
    )
    return {"table": table, "support": support}


def _is_class_index(v) -> bool:
    """An int (not a bool) or a NumPy integer, as prediction records hold class indices."""
    return is_int(v) or isinstance(v, np.integer)
