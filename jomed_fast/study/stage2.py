r"""What stage 2 did, per head, read back from its run folder: the digest the study tabulates.

For each head (``stage2/<head>/result.json`` of ``train.train_retriever``): the epoch the
validation selection kept (0: the base retriever's weights), the fused validation accuracy before
training and at the kept epoch, and per epoch the diagnostics of ``train.retriever_diagnostics``:
the KL, the target's entropy as a share of :math:`\log K` (1: a flat target, nothing to learn
from), the reader-right share of the candidates, the gradient norm, the distinct records
retrieved on validation (against the count before training), and the warnings it raised.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["HEADS", "stage2_digest"]

HEADS = ("text", "image")


def _epoch_row(e: dict) -> dict:
    d, ev = e.get("diagnostics") or {}, e.get("eval") or {}
    log_k = d.get("log_k")
    return {
        "epoch": e["epoch"],
        "kl": d.get("kl"),
        "target_entropy_share": d["target_entropy"] / log_k if log_k else None,
        "retriever_entropy_share": d["retriever_entropy"] / log_k if log_k else None,
        "reader_right_share": d.get("reader_right_share"),
        "grad_norm": d.get("grad_norm"),
        "val_distinct_records": ev.get("distinct_records"),
        "val_system_accuracy": ev.get("system_accuracy"),
    }


def stage2_digest(stage2_dir) -> dict:
    """``{head: digest}`` (module docstring) of every head whose ``result.json`` is there."""
    out = {}
    for head in HEADS:
        path = Path(stage2_dir) / head / "result.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        first = r.get("initial_eval") or {}
        selected = r.get("selected") or {}
        out[head] = {
            "selected_epoch": selected.get("epoch"),
            "val_system_accuracy_before": first.get("system_accuracy"),
            "val_system_accuracy_selected": selected.get("accuracy"),
            "val_distinct_records_before": first.get("distinct_records"),
            "epochs": [_epoch_row(e) for e in r.get("epochs", [])],
            "warnings": sorted({w["kind"] for w in r.get("warnings", [])}),
            "dedup": r.get("dedup"),
        }
    return out
