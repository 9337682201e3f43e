r"""Stage 2's loss and its agreement metric: the retriever's scores over K candidates distilled from
the reader's posterior (Sharp Perplexity Distillation).

.. math::
    s_{b,k} = \tilde q_b \cdot e_k \qquad
    \mathcal{L} = \frac1B \sum_b \mathrm{KL}\big(\mathrm{softmax}(t_b/\tau_{reader}) \,\|\,
        \mathrm{softmax}(s_b/\tau_{retriever})\big)

The target logits :math:`t` (``TARGETS``) start from a gold score per candidate, computed from the
reader's class log-probabilities ``l [B, K, C]`` (``log_softmax`` of the class logits):

* the paper's gold :math:`r_{b,k} = l_{b,k,a_b} = \log p_C(a_b \mid z_k, q_b)` (``gold_scores(...,
  "paper")``);
* the authors' code's gold :math:`\rho_{b,k} = -\mathrm{CE}(\mathrm{softmax}(l_{b,k}), a_b) =
  \log\mathrm{softmax}(\mathrm{softmax}(l_{b,k}))_{a_b}` (``"reference_double_softmax"``): the
  code passes probabilities to ``cross_entropy``, which applies a second softmax. Every entry of
  :math:`\mathrm{softmax}(l)` lies in [0, 1], so :math:`\rho` spans at most 1 nat across candidates
  and its target is nearly uniform: on the seeded 50 x 7 toy of ``tests/test_named_options.py``
  (class logits 3 N(0, 1), gold class 0) the target's entropy is 3.86 nats with the code's gold
  and 2.51 with the paper's, of a uniform 3.91 (ln 50).

Then :math:`t` per ``target``:

==========================================  ====================================================
``target``                                  :math:`t`
==========================================  ====================================================
``"gold"`` (the paper, default)             :math:`r`
``"gold_with_retriever_prior"``             :math:`\log\mathrm{softmax}(r) +
                                            \log\mathrm{softmax}(s.\mathrm{detach}())`: the
                                            paper's gold with the scripts' prior (this project's
                                            combination; not what the code computes)
``"reference_double_softmax_gold"``         :math:`\rho`
``"reference_double_softmax_gold_with_prior"``  :math:`\log\mathrm{softmax}(\rho) +
                                            \log\mathrm{softmax}(s.\mathrm{detach}())`: exactly
                                            the authors' ``--add_prior_to_gold_score``
                                            (``src/jomed.py``)
==========================================  ====================================================
"""

from __future__ import annotations

import torch

from .. import ops
from .pair_scores import gold_log_likelihoods

__all__ = [
    "TARGETS",
    "distillation_loss",
    "distillation_target",
    "gold_kind",
    "gold_scores",
    "retriever_scores",
    "top1_agreement",
]

# target -> (gold score, whether the retriever's detached log-prior is added)
_TARGETS = {
    "gold": ("paper", False),
    "gold_with_retriever_prior": ("paper", True),
    "reference_double_softmax_gold": ("reference_double_softmax", False),
    "reference_double_softmax_gold_with_prior": ("reference_double_softmax", True),
}
TARGETS = tuple(_TARGETS)


def _check_target(target: str) -> tuple[str, bool]:
    if target not in _TARGETS:
        raise ValueError(f"target: expected one of {TARGETS}, got {target!r}")
    return _TARGETS[target]


def gold_kind(target: str) -> str:
    """The gold score ``target`` starts from: ``"paper"`` or ``"reference_double_softmax"``."""
    return _check_target(target)[0]


def gold_scores(rows: torch.Tensor, labels: torch.Tensor, kind: str = "paper", head=None) -> torch.Tensor:
    """``rows [B, K, C]`` class log-probs and gold classes ``labels [B]`` -> gold scores ``[B, K]``
    of ``kind`` (see the module docstring: the paper's ``r`` or the code's ``rho``). Multi-label:
    ``rows`` over the answer sets of the scorer's label-set ``head`` and ``labels [B, C]`` multi-hot
    (``gold_log_likelihoods``)."""
    if kind == "paper":
        return gold_log_likelihoods(rows, labels, head)
    if kind == "reference_double_softmax":
        # softmax over the classes (rows are log-probs: the same as over the class logits), then
        # the log_softmax that cross_entropy applies to whatever it is given
        probs = torch.softmax(rows.float(), -1)
        return gold_log_likelihoods(torch.log_softmax(probs, -1), labels, head)
    raise ValueError(f"kind: expected 'paper' or 'reference_double_softmax', got {kind!r}")


def retriever_scores(q: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``q [B, D]`` x ``e [B, K, D]`` -> ``s [B, K]`` with ``s[b, k] = q[b] · e[b, k]``."""
    if q.dim() != 2 or e.dim() != 3 or e.shape[0] != q.shape[0] or e.shape[2] != q.shape[1]:
        raise ValueError(f"q, e: expected [B, D] and [B, K, D], got {tuple(q.shape)} and {tuple(e.shape)}")
    return torch.einsum("bd,bkd->bk", q, e.to(q))  # e from the index's device to the encoder's


def distillation_target(s: torch.Tensor, r: torch.Tensor, target: str) -> torch.Tensor:
    """Target logits ``[B, K]`` (divided by ``tau_reader`` inside the loss) from the gold scores
    ``r`` of ``gold_kind(target)``; see the module docstring."""
    _, prior = _check_target(target)
    if not prior:
        return r
    return torch.log_softmax(r.float(), -1) + torch.log_softmax(s.detach().float(), -1)


def distillation_loss(s: torch.Tensor, r: torch.Tensor, config) -> torch.Tensor:
    """The stage-2 loss (scalar, mean over B): ``KL(softmax(t / tau_reader) || softmax(s / tau_retriever))``
    with ``config``'s ``target`` (``r``: the gold scores of its :func:`gold_kind`), ``tau_reader``
    and ``tau_retriever``."""
    t = distillation_target(s, r, config.target)
    return ops.retrieval_kl_loss(s, t, config.tau_retriever, config.tau_reader)


def top1_agreement(s: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: the retriever's top candidate is the reader's (argmax over K, first on ties)."""
    return s.argmax(-1) == r.argmax(-1)
