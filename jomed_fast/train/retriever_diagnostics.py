r"""Stage 2's diagnostics: what tells a run that distillation has something to learn, and that the
retriever it trains still retrieves broadly.

Per training step (summed into the epoch's record, averaged at its end):

* **target entropy** :math:`H(p_b) = -\sum_k p_{b,k}\log p_{b,k}`, :math:`p_b =
  \mathrm{softmax}(t_b/\tau_{reader})` (``target_entropy``), and **retriever entropy**
  :math:`H(q_b)`, :math:`q_b = \mathrm{softmax}(s_b/\tau_{retriever})`, in nats, beside
  :math:`\log K` (the entropy of a uniform distribution over the K candidates);
* **reader-right share**: the share of the :math:`B K` (query, candidate) pairs whose reader
  prediction is the gold answer, :math:`[\arg\max_c l_{b,k,c} = a_b]` (``reader_right``; multi-label:
  the argmax over the answer sets is the gold set);
* **gradient norm**: :math:`\lVert\nabla_\theta\mathcal L\rVert_2` over the trained parameters,
  after ``backward`` and before any clipping (``grad_norm``).

Per evaluation (the head's top ``select_k`` under the trained query embedding, the rows inference
would hand the reader): the number of **distinct index records** retrieved over all the
validation queries (``distinct_records``) and the **per-class coverage**, for each gold class of the
queries the number of distinct records its queries retrieve (``per_class_distinct``; index records
carry no label, so coverage counts records, not records of the right class). Multi-label queries
are grouped by their gold set written as a sorted tuple.

Warnings (``epoch_warnings``), each one line:

* **flat target**: the epoch's mean target entropy :math:`\ge` ``flat_target_ratio`` :math:`\cdot
  \log K` — the reader scores the candidates (nearly) alike, the KL's gradient vanishes and AdamW
  rescales what is left into full steps (identical captions give exactly :math:`\log K`);
* **retrieval collapse**: the evaluation's distinct records :math:`<` ``collapse_ratio`` :math:`\cdot`
  those of the evaluation before training (the base retriever's).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

__all__ = [
    "distinct_records",
    "entropy",
    "epoch_warnings",
    "grad_norm",
    "per_class_distinct",
    "reader_right",
]


def entropy(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """``[B]`` nats: the entropy of ``softmax(logits / tau)`` over the last axis (float64)."""
    logp = torch.log_softmax(logits.detach().double() / tau, -1)
    return -(logp.exp() * logp).sum(-1)


def reader_right(rows: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` bool: the reader's prediction for the pair is the gold answer — its gold entry
    ``gold [B, K]`` (``gold_scores(rows, labels, "paper")``) is the row's maximum."""
    return gold >= rows.amax(-1)


def grad_norm(params: Iterable[torch.Tensor]) -> float:
    """The total L2 norm of the parameters' gradients (0.0 when none has one)."""
    squares = [float((p.grad.detach().double() ** 2).sum()) for p in params if p.grad is not None]
    return math.sqrt(sum(squares))


def distinct_records(ids: Iterable[Iterable[int]]) -> int:
    """How many distinct index rows ``ids`` (per query, its retrieved rows) hold."""
    return len({int(r) for row in ids for r in row})


def _class_name(label) -> str:
    if isinstance(label, torch.Tensor):
        if label.dim() == 0:
            return str(int(label))
        return str(tuple(torch.nonzero(label).flatten().tolist()))
    return str(label)


def per_class_distinct(ids: Iterable[Iterable[int]], labels: Iterable) -> dict[str, int]:
    """``{gold class: distinct index rows retrieved by that class's queries}`` (classes as strings,
    sorted; a multi-hot gold set as the tuple of its classes)."""
    seen: dict[str, set[int]] = {}
    for row, label in zip(ids, labels):
        seen.setdefault(_class_name(label), set()).update(int(r) for r in row)
    return {c: len(seen[c]) for c in sorted(seen)}


def epoch_warnings(train: dict, ev: dict | None, initial: dict | None, config) -> list[str]:
    """The warnings of one epoch of one head (see the module docstring); ``train`` the epoch's
    diagnostics (``target_entropy``, ``log_k``), ``ev`` / ``initial`` this epoch's and the first
    evaluation (``distinct_records``), ``config`` the thresholds."""
    out = []
    h, log_k = train.get("target_entropy"), train.get("log_k")
    if h is not None and log_k and h >= config.flat_target_ratio * log_k:
        out.append(
            f"flat target: mean target entropy {h:.4f} nats >= {config.flat_target_ratio} x log K "
            f"({log_k:.4f}); the reader scores the {config.head} candidates alike and the KL gives "
            "the retriever (almost) no signal"
        )
    if ev is not None and initial is not None and ev.get("distinct_records") is not None:
        before, now = initial["distinct_records"], ev["distinct_records"]
        if before and now < config.collapse_ratio * before:
            out.append(
                f"retrieval collapse: {now} distinct index records retrieved on validation, < "
                f"{config.collapse_ratio} x the {before} before training"
            )
    return out
