r"""Fusion of the K candidates' class predictions into one answer per query.

Inputs: the reader's class log-probabilities ``l`` ``[B, K, C]`` (one row per retrieved candidate)
and the retrieval scores ``s`` ``[B, K]`` with each candidate's head (``"text"`` / ``"image"``).

``paper`` — the paper's marginalisation over the retrieved pairs (JOMED eq. for inference):

.. math:: p(c \mid q) = \sum_k p(c \mid z_k \circ q) \, \operatorname{softmax}_k(s_{k} / \tau)

computed by ``ops.fuse_candidates`` (Triton on GPU).

``reference`` — what the published code computes (its numbers come from it): each head's scores
are divided by that head's maximum over the query's candidates, one softmax over all K, and the
weighted sum of the candidates' class *logits*:

.. math:: w = \operatorname{softmax}_k\big(s_k / \max_{j \in h(k)} s_j\big), \qquad
          p(c \mid q) = \operatorname{softmax}_c \Big(\sum_k w_k \, l_{k, c}\Big)

The class logits and the restricted log-probabilities differ per candidate by a constant
(the log-partition over the classes), so :math:`\sum_k w_k l_{k,c}` shifts by one constant per query
and the softmax over classes (and every decision) is the same as with the logits themselves.

Multi-label tasks: ``l`` holds each label's log *marginal* ``log p(c ∈ S | z_k ∘ q)`` (the
reader's restricted answer-set distribution, ``scoring.label_set_head``), not a distribution over
the labels. ``paper`` fuses them as they are: the weighted sum of the candidates' marginals is the
marginal of the fused (mixture) answer distribution :math:`\sum_k w_k\, p(S \mid z_k \circ q)`, so
:math:`p(c \in S \mid q) = \sum_k w_k\, p(c \in S \mid z_k \circ q)`. ``reference`` keeps its
weights (per-head normalised scores, one softmax) and takes the same weighted sum of marginals:
a softmax over the labels would force them to compete for one unit of probability, which a set
answer does not (``multilabel=True``).

Decisions (``decide``): binary, multi-class and closed VQA take the argmax of the fused
distribution; multi-label takes every label whose fused marginal reaches ``threshold``
(default 0.5; labels are thresholded independently, so any number of them can be chosen) — and
the most probable label when none does, since every multi-label answer names at least one label.
"""

from __future__ import annotations

import torch

from .. import ops

__all__ = ["FUSIONS", "decide", "fuse", "head_normalized_scores"]

FUSIONS = ("paper", "reference")


def head_normalized_scores(scores: torch.Tensor, heads: list) -> torch.Tensor:
    """``s_k / max_{j in head(k)} s_j`` per query (the reference's per-head normalisation) ``[B, K]``."""
    if len(heads) != scores.shape[0] or any(len(h) != scores.shape[1] for h in heads):
        raise ValueError(
            f"heads: expected {scores.shape[0]} lists of {scores.shape[1]} head names, got {[len(h) for h in heads]}"
        )
    out = scores.clone().float()
    for b, row in enumerate(heads):
        for head in set(row):
            cols = torch.tensor([k for k, h in enumerate(row) if h == head])
            top = out[b, cols].max()
            if top <= 0:
                raise ValueError(
                    f"scores: the reference fusion divides by each head's maximum, which must be "
                    f"positive; query {b} head {head!r} has max {float(top):.4g}"
                )
            out[b, cols] = out[b, cols] / top
    return out


def fuse(
    log_probs: torch.Tensor,
    scores: torch.Tensor,
    heads: list | None = None,
    method: str = "paper",
    tau: float = 1.0,
    *,
    multilabel: bool = False,
) -> torch.Tensor:
    """Fused class posterior ``[B, C]`` (float32) from ``[B, K, C]`` log-probs and ``[B, K]`` scores
    (``multilabel``: per-label marginals from per-label log marginals, see the module docstring)."""
    if method not in FUSIONS:
        raise ValueError(f"method: expected one of {FUSIONS}, got {method!r}")
    if log_probs.ndim != 3 or scores.shape != log_probs.shape[:2]:
        raise ValueError(
            f"log_probs, scores: expected [B, K, C] and [B, K], got {list(log_probs.shape)} and {list(scores.shape)}"
        )
    if method == "paper":
        return ops.fuse_candidates(log_probs, scores.to(log_probs.dtype), tau)
    if heads is None:
        raise ValueError("heads: the reference fusion needs each candidate's head")
    weights = torch.softmax(head_normalized_scores(scores, heads), dim=1)
    if multilabel:
        return (weights.unsqueeze(-1) * log_probs.float().exp()).sum(1)
    return torch.softmax((weights.unsqueeze(-1) * log_probs.float()).sum(1), dim=-1)


def decide(probs: torch.Tensor, multilabel: bool = False, threshold: float = 0.5) -> list:
    """Per-query decision from ``[B, C]`` probabilities: class index, or sorted label list (multi-label)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold: expected a float in (0, 1], got {threshold}")
    if not multilabel:
        return [int(i) for i in probs.argmax(-1)]
    out = []
    for row in probs:
        chosen = [int(i) for i in torch.nonzero(row >= threshold).flatten()]
        out.append(chosen or [int(row.argmax())])
    return out
