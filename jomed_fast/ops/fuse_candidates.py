"""``fuse_candidates``: JOMED's inference fusion of the reader's per-candidate answers.

``fuse_candidates(candidate_log_probs, retriever_scores, tau=1.0)``: ``l`` ``[B, K, C]`` (the
reader's class log-probabilities given each candidate) and ``s`` ``[B, K]`` (fp32 / fp16 / bf16
each), a finite tau > 0 -> float32 ``[B, C]``, the fused posterior ``p(c | q)``: each candidate's
class probabilities weighted by the softmax of the scores over K at temperature tau. It sums to 1
over C when every ``exp(l[b, k])`` does. ``fuse_candidates_reference`` (plain torch) is the
specification; the tests hold both paths to it in float64. Differentiable w.r.t. both inputs, each
gradient in its input's dtype.

A ``-inf`` log-probability or a ``-inf`` score (weight 0) adds nothing. NaN propagates, never
crashes: a query whose scores are all ``-inf`` has no weights and gives a NaN row; a NaN score
makes its query's row NaN, a NaN log-probability its class entry. A bad argument is a
``TypeError`` / ``ValueError`` naming it.

Dispatch (``jomed_fast.ops``): CUDA tensors run the Triton kernels of
``jomed_fast.kernels.fuse_candidates``, whose docstring holds the math (the fusion, written
without overflow, and both gradients) and the memory traffic; CPU tensors run the torch path here.
Registered as ``torch.ops.jomed_fast.fuse_candidates`` (backward: ``fuse_candidates_backward``) so
callers compile under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch

from ._checks import check_floating, check_ndim, check_positive, check_same_device
from ._dispatch import choose_backend

_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _log_weights(retriever_scores: torch.Tensor, tau: float) -> torch.Tensor:
    """``log_softmax(s / tau)`` over K, shifted by the row max *before* the division: the same value,
    but at |s| ~ 1e4 and tau = 0.01 the unshifted s / tau ~ 1e6 loses fp32 digits."""
    s = retriever_scores
    return torch.log_softmax((s - s.amax(dim=-1, keepdim=True).detach()) / tau, dim=-1)


def fuse_candidates_reference(
    candidate_log_probs: torch.Tensor, retriever_scores: torch.Tensor, tau: float = 1.0
) -> torch.Tensor:
    """``sum_k exp(l[:, k]) * softmax(s / tau)[:, k]`` ``[B, C]``, computed in at least fp32 (float64
    for float64 input)."""
    dtype = torch.promote_types(candidate_log_probs.dtype, retriever_scores.dtype)
    dtype = torch.promote_types(dtype, torch.float32)
    log_w = _log_weights(retriever_scores.to(dtype), tau)
    return torch.exp(candidate_log_probs.to(dtype) + log_w.unsqueeze(-1)).sum(dim=1)


@torch.library.custom_op("jomed_fast::fuse_candidates", mutates_args=())
def _forward(candidate_log_probs: torch.Tensor, retriever_scores: torch.Tensor, tau: float) -> torch.Tensor:
    """l ``[B, K, C]``, s ``[B, K]`` -> float32 ``[B, C]``."""
    if choose_backend(candidate_log_probs.device) == "triton":
        from jomed_fast.kernels.fuse_candidates import fuse_candidates_forward

        return fuse_candidates_forward(candidate_log_probs, retriever_scores, tau)
    return fuse_candidates_reference(candidate_log_probs, retriever_scores, tau).float()


@_forward.register_fake
def _(candidate_log_probs, retriever_scores, tau):
    B, _, C = candidate_log_probs.shape
    return candidate_log_probs.new_empty((B, C), dtype=torch.float32)


@torch.library.custom_op("jomed_fast::fuse_candidates_backward", mutates_args=())
def _backward(
    grad_out: torch.Tensor, candidate_log_probs: torch.Tensor, retriever_scores: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_out ``[B, C]`` -> (d l ``[B, K, C]``, d s ``[B, K]``) (the formulas:
    ``jomed_fast.kernels.fuse_candidates``)."""
    if choose_backend(candidate_log_probs.device) == "triton":
        from jomed_fast.kernels.fuse_candidates import fuse_candidates_backward

        return fuse_candidates_backward(grad_out, candidate_log_probs, retriever_scores, tau)
    log_w = _log_weights(retriever_scores.float(), tau)
    grad_l = grad_out.float().unsqueeze(1) * torch.exp(candidate_log_probs.float() + log_w.unsqueeze(-1))
    a = grad_l.sum(dim=-1)
    grad_s = (a - log_w.exp() * a.sum(dim=-1, keepdim=True)) / tau
    return grad_l.to(candidate_log_probs.dtype), grad_s.to(retriever_scores.dtype)


@_backward.register_fake
def _(grad_out, candidate_log_probs, retriever_scores, tau):
    return (
        torch.empty_like(candidate_log_probs, memory_format=torch.contiguous_format),
        torch.empty_like(retriever_scores, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    candidate_log_probs, retriever_scores, tau = inputs
    # Only the inputs are saved: the backward recomputes exp(l + log w), which it must read l for anyway.
    ctx.save_for_backward(candidate_log_probs, retriever_scores)
    ctx.tau = tau


def _backward_rule(ctx, grad_out):
    candidate_log_probs, retriever_scores = ctx.saved_tensors
    grad_l, grad_s = _backward(grad_out.float(), candidate_log_probs, retriever_scores, ctx.tau)
    return grad_l, grad_s, None


_forward.register_autograd(_backward_rule, setup_context=_setup_context)


def fuse_candidates(
    candidate_log_probs: torch.Tensor, retriever_scores: torch.Tensor, tau: float = 1.0
) -> torch.Tensor:
    """Fused class posterior ``sum_k exp(l[:, k]) softmax(s / tau)[:, k]``: ``[B, K, C]`` x ``[B, K]``
    -> float32 ``[B, C]``. Differentiable w.r.t. both inputs (see the module docstring)."""
    check_floating("candidate_log_probs", candidate_log_probs, _INPUT_DTYPES)
    check_floating("retriever_scores", retriever_scores, _INPUT_DTYPES)
    check_ndim("candidate_log_probs", candidate_log_probs, 3, "B, K, C")
    check_ndim("retriever_scores", retriever_scores, 2, "B, K")
    check_same_device(candidate_log_probs=candidate_log_probs, retriever_scores=retriever_scores)
    B, K, C = candidate_log_probs.shape
    if K == 0 or C == 0:
        raise ValueError(
            "candidate_log_probs: expected shape [B, K, C] with K >= 1 and C >= 1, "
            f"got {tuple(candidate_log_probs.shape)}"
        )
    if retriever_scores.shape != (B, K):
        raise ValueError(
            f"retriever_scores: expected shape [B, K] = {(B, K)} (B and K of candidate_log_probs), "
            f"got {tuple(retriever_scores.shape)}"
        )
    tau = check_positive("tau", tau)
    return _forward(candidate_log_probs, retriever_scores, tau)
