r"""Stage 2's loss and its agreement metric: the retriever's scores over K candidates distilled from
the reader's posterior (Sharp Perplexity Distillation).

.. math::
    s_{b,k} = \tilde q_b \cdot e_k \qquad
    \mathcal{L} = \frac1B \sum_b \mathrm{KL}\big(\mathrm{softmax}(t_b/\tau_{reader}) \,\|\,
        \mathrm{softmax}(s_b/\tau_{retriever})\big)

with target logits :math:`t = r` (``"gold"``, the paper: the reader's gold log-likelihoods
``r [B, K]``) or :math:`t = \log\mathrm{softmax}(r) + \log\mathrm{softmax}(s.\mathrm{detach}())`
(``"gold_with_retriever_prior"``, the reference scripts' ``--add_prior_to_gold_score``).
"""

from __future__ import annotations

import torch

from .. import ops

__all__ = ["distillation_loss", "distillation_target", "retriever_scores", "top1_agreement"]


def retriever_scores(q: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``q [B, D]`` x ``e [B, K, D]`` -> ``s [B, K]`` with ``s[b, k] = q[b] · e[b, k]``."""
    if q.dim() != 2 or e.dim() != 3 or e.shape[0] != q.shape[0] or e.shape[2] != q.shape[1]:
        raise ValueError(f"q, e: expected [B, D] and [B, K, D], got {tuple(q.shape)} and {tuple(e.shape)}")
    return torch.einsum("bd,bkd->bk", q, e.to(q))  # e from the index's device to the encoder's


def distillation_target(s: torch.Tensor, r: torch.Tensor, target: str) -> torch.Tensor:
    """Target logits ``[B, K]`` (divided by ``tau_reader`` inside the loss); see the module docstring."""
    if target == "gold":
        return r
    if target == "gold_with_retriever_prior":
        return torch.log_softmax(r.float(), -1) + torch.log_softmax(s.detach().float(), -1)
    raise ValueError(f"target: expected 'gold' or 'gold_with_retriever_prior', got {target!r}")


def distillation_loss(s: torch.Tensor, r: torch.Tensor, config) -> torch.Tensor:
    """The stage-2 loss (scalar, mean over B): ``KL(softmax(t / tau_reader) || softmax(s / tau_retriever))``
    with ``config``'s ``target``, ``tau_reader`` and ``tau_retriever``."""
    t = distillation_target(s, r, config.target)
    return ops.retrieval_kl_loss(s, t, config.tau_retriever, config.tau_reader)


def top1_agreement(s: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: the retriever's top candidate is the reader's (argmax over K, first on ties)."""
    return s.argmax(-1) == r.argmax(-1)
