"""``retrieval_kl_loss``: JOMED's Sharp Perplexity Distillation loss for the retriever.

``retrieval_kl_loss(retriever_scores, reader_log_likelihoods, tau_retriever=1.0, tau_reader=1.0,
reduction="batchmean")``: scores ``s`` and the reader's log-likelihoods ``r``, both ``[B, K]`` with
K >= 1 (fp32 / fp16 / bf16), finite temperatures > 0 -> float32, per query the KL divergence from
the reader's posterior over the K candidates (the target, ``softmax(r / tau_reader)``) to the
retriever's (``softmax(s / tau_retriever)``): ``[B]`` with ``reduction="none"``, its mean over B
with ``"batchmean"``, its sum with ``"sum"``. ``retrieval_kl_loss_reference`` (plain torch) is the
specification; the tests hold both paths to it in float64. Only ``s`` gets a gradient, in its
dtype; ``r`` is the target and is never differentiated.

A ``-inf`` reader log-likelihood gives its candidate no mass, which adds nothing (0 log 0 = 0). NaN
propagates, never crashes: a row where all reader log-likelihoods (or all scores) are ``-inf`` has
no distribution, so its loss and its score gradients are NaN (and so is a ``batchmean`` or ``sum``
over it); a NaN input entry makes its row NaN. A score of ``-inf`` where the reader puts mass gives
``+inf`` (the KL is unbounded there) with a finite gradient. With B = 0, ``"batchmean"`` is NaN
(0 / 0, as ``torch.mean`` of nothing). A bad argument is a ``TypeError`` / ``ValueError`` naming it.

Dispatch (``jomed_fast.ops``): CUDA tensors run the Triton kernels of
``jomed_fast.kernels.retrieval_kl_loss``, whose docstring holds the math (the loss, its gradient,
the shift that keeps precision at small temperatures) and why the backward recomputes rather than
saves; CPU tensors run the torch path here. The per-row loss is registered as
``torch.ops.jomed_fast.retrieval_kl_loss`` (backward: ``retrieval_kl_loss_backward``) so callers
compile under ``torch.compile(fullgraph=True)``; the reduction is plain torch around it.
"""

from __future__ import annotations

import torch

from ._checks import check_floating, check_ndim, check_positive, check_same_device
from ._dispatch import choose_backend

_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REDUCTIONS = ("batchmean", "sum", "none")


def check_reduction(name: str, reduction: object) -> str:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"{name}: expected one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def _scaled_log_softmax(x: torch.Tensor, tau: float) -> torch.Tensor:
    """``log_softmax(x / tau)`` over the last dim, shifted by the row max *before* the division:
    the same value, but at |x| ~ 1e4 and tau = 0.01 the unshifted x / tau ~ 1e6 loses fp32 digits."""
    return torch.log_softmax((x - x.amax(dim=-1, keepdim=True).detach()) / tau, dim=-1)


def retrieval_kl_loss_reference(
    retriever_scores: torch.Tensor,
    reader_log_likelihoods: torch.Tensor,
    tau_retriever: float = 1.0,
    tau_reader: float = 1.0,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """``KL(softmax(r / tau_reader) || softmax(s / tau_retriever))`` per row, reduced; computed in at
    least fp32 (float64 for float64 input). ``r`` is detached: it is the target."""
    dtype = torch.promote_types(retriever_scores.dtype, reader_log_likelihoods.dtype)
    dtype = torch.promote_types(dtype, torch.float32)
    log_q = _scaled_log_softmax(retriever_scores.to(dtype), tau_retriever)
    log_p = _scaled_log_softmax(reader_log_likelihoods.detach().to(dtype), tau_reader)
    p = log_p.exp()
    # 0 log 0 = 0. `p == 0` (not `p > 0`) keeps a NaN p NaN.
    rows = torch.where(p == 0, 0.0, p * (log_p - log_q)).sum(dim=-1)
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.mean()


@torch.library.custom_op("jomed_fast::retrieval_kl_loss", mutates_args=())
def _forward(
    retriever_scores: torch.Tensor, reader_log_likelihoods: torch.Tensor, tau_retriever: float, tau_reader: float
) -> torch.Tensor:
    """s, r ``[B, K]`` -> per-row loss float32 ``[B]``."""
    if choose_backend(retriever_scores.device) == "triton":
        from jomed_fast.kernels.retrieval_kl_loss import retrieval_kl_loss_forward

        return retrieval_kl_loss_forward(retriever_scores, reader_log_likelihoods, tau_retriever, tau_reader)
    return retrieval_kl_loss_reference(
        retriever_scores, reader_log_likelihoods, tau_retriever, tau_reader, reduction="none"
    ).float()


@_forward.register_fake
def _(retriever_scores, reader_log_likelihoods, tau_retriever, tau_reader):
    return retriever_scores.new_empty((retriever_scores.shape[0],), dtype=torch.float32)


@torch.library.custom_op("jomed_fast::retrieval_kl_loss_backward", mutates_args=())
def _backward(
    grad_loss: torch.Tensor,
    retriever_scores: torch.Tensor,
    reader_log_likelihoods: torch.Tensor,
    tau_retriever: float,
    tau_reader: float,
) -> torch.Tensor:
    """grad_loss ``[B]`` -> d s ``[B, K]`` in the dtype of s (the formula: ``jomed_fast.kernels.retrieval_kl_loss``)."""
    if choose_backend(retriever_scores.device) == "triton":
        from jomed_fast.kernels.retrieval_kl_loss import retrieval_kl_loss_backward

        return retrieval_kl_loss_backward(
            grad_loss, retriever_scores, reader_log_likelihoods, tau_retriever, tau_reader
        )
    q = _scaled_log_softmax(retriever_scores.float(), tau_retriever).exp()
    p = _scaled_log_softmax(reader_log_likelihoods.float(), tau_reader).exp()
    return ((q - p) * (grad_loss.float() / tau_retriever).unsqueeze(-1)).to(retriever_scores.dtype)


@_backward.register_fake
def _(grad_loss, retriever_scores, reader_log_likelihoods, tau_retriever, tau_reader):
    return torch.empty_like(retriever_scores, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    retriever_scores, reader_log_likelihoods, tau_retriever, tau_reader = inputs
    # Nothing but the inputs is saved: the backward recomputes q and p (see the kernel's docstring).
    ctx.save_for_backward(retriever_scores, reader_log_likelihoods)
    ctx.taus = (tau_retriever, tau_reader)


def _backward_rule(ctx, grad_loss):
    retriever_scores, reader_log_likelihoods = ctx.saved_tensors
    grad = _backward(grad_loss.float(), retriever_scores, reader_log_likelihoods, *ctx.taus)
    return grad, None, None, None


_forward.register_autograd(_backward_rule, setup_context=_setup_context)


def retrieval_kl_loss(
    retriever_scores: torch.Tensor,
    reader_log_likelihoods: torch.Tensor,
    tau_retriever: float = 1.0,
    tau_reader: float = 1.0,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """KL from the reader's posterior over the K candidates to the retriever's: ``[B, K]`` x ``[B, K]``
    -> float32 scalar (``"batchmean"``, ``"sum"``) or ``[B]`` (``"none"``). Differentiable w.r.t.
    ``retriever_scores`` only."""
    check_floating("retriever_scores", retriever_scores, _INPUT_DTYPES)
    check_floating("reader_log_likelihoods", reader_log_likelihoods, _INPUT_DTYPES)
    check_ndim("retriever_scores", retriever_scores, 2, "B, K")
    check_ndim("reader_log_likelihoods", reader_log_likelihoods, 2, "B, K")
    check_same_device(retriever_scores=retriever_scores, reader_log_likelihoods=reader_log_likelihoods)
    if reader_log_likelihoods.shape != retriever_scores.shape:
        raise ValueError(
            f"reader_log_likelihoods: expected shape [B, K] = {tuple(retriever_scores.shape)} (the shape of "
            f"retriever_scores), got {tuple(reader_log_likelihoods.shape)}"
        )
    if retriever_scores.shape[1] == 0:
        raise ValueError(f"retriever_scores: expected shape [B, K] with K >= 1, got {tuple(retriever_scores.shape)}")
    tau_retriever = check_positive("tau_retriever", tau_retriever)
    tau_reader = check_positive("tau_reader", tau_reader)
    check_reduction("reduction", reduction)
    rows = _forward(retriever_scores, reader_log_likelihoods, tau_retriever, tau_reader)
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.mean()
