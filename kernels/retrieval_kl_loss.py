r"""Retrieval KL loss (JOMED's Sharp Perplexity Distillation), fused forward and backward.

For each query b with K retrieved candidates, retriever scores ``s`` ``[B, K]`` and the reader's
log-likelihoods ``r`` ``[B, K]`` of the answer given each candidate,

.. math::

    \log q_{b,k} = \log\operatorname{softmax}_k(s_{b,k} / \tau_s), \qquad
    p_{b,k} = \operatorname{softmax}_k(r_{b,k} / \tau_r), \qquad
    \ell_b = \sum_k p_{b,k} (\log p_{b,k} - \log q_{b,k}),

with :math:`0 \log 0 = 0` (a candidate with ``r = -inf`` has ``p = 0`` and adds nothing). ``p`` is a
constant target, so only the scores get a gradient:

.. math::

    \frac{\partial L}{\partial s_{b,k}} = g_b \, \frac{q_{b,k} - p_{b,k}}{\tau_s}

(:math:`g_b` is the upstream gradient of row b: ``1/B`` for ``batchmean``, ``1`` for ``sum``).

Both log-softmaxes are taken as ``(x - max_k x) / tau - lse``: the shift happens before the
division, so at ``|s| ~ 1e4`` and ``tau = 0.01`` the scaled values keep fp32 relative precision
(fp32 resolves ``s / tau ~ 1e6`` only to steps of 0.06). Statistics are fp32 whatever
the score dtype.

Design: one program per block of BLOCK_B rows, each row's K entries held in registers
(BLOCK_K = next power of two of K; K = 50 in the paper). Shipped and checked for spills up to
K = 4096 (``aot_specs``); a wider K compiles a wider tile on demand. The forward writes only the
per-row loss ``[B]``; the backward *recomputes* q and p from ``s`` and ``r`` rather than saving
``q - p``: autograd keeps ``s`` and ``r`` alive anyway, so recomputing costs no extra memory; the
bytes moved are the same either way (saving makes the forward write ``B x K`` more and the backward
read ``B x K`` less, 5 ``B x K`` in total both ways); and the recompute is two exp per element in a
kernel bound by memory traffic and launch latency.

Layout: kernels -> launchers -> ``aot_specs()``; the contract (shapes, dtypes, special values,
errors), the autograd wiring, the reduction and the torch reference live in
``jomed_fast/ops/retrieval_kl_loss.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import AotSpec, interpreter_enabled


@triton.jit
def _scaled_log_softmax(x, inv_tau):
    """Row-wise ``log_softmax(x * inv_tau)`` of a ``[BLOCK_B, BLOCK_K]`` fp32 tile padded with -inf."""
    row_max = tl.max(x, axis=1)
    # Shift, then scale: keeps the relative precision of x - max when x * inv_tau would be huge.
    z = (x - row_max[:, None]) * inv_tau
    # Padding columns are -inf, so exp gives 0 there; an all -inf row gives NaN (no distribution).
    lse = tl.log(tl.sum(tl.exp(z), axis=1))
    return z - lse[:, None]


@triton.jit
def _load_rows(
    s_ptr, r_ptr, B, K, stride_sb, stride_sk, stride_rb, stride_rk, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < B
    mask = row_ok[:, None] & (cols < K)[None, :]
    rows64 = rows.to(tl.int64)  # B * K can pass 2**31 when a whole test set is scored at once
    s = tl.load(s_ptr + rows64[:, None] * stride_sb + cols[None, :] * stride_sk, mask=mask, other=float("-inf"))
    r = tl.load(r_ptr + rows64[:, None] * stride_rb + cols[None, :] * stride_rk, mask=mask, other=float("-inf"))
    return rows64, cols, row_ok, mask, s.to(tl.float32), r.to(tl.float32)


@triton.jit
def _retrieval_kl_loss_fwd_kernel(
    s_ptr,
    r_ptr,
    loss_ptr,
    B,
    K,
    stride_sb,
    stride_sk,
    stride_rb,
    stride_rk,
    inv_tau_s,
    inv_tau_r,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows64, cols, row_ok, mask, s, r = _load_rows(
        s_ptr, r_ptr, B, K, stride_sb, stride_sk, stride_rb, stride_rk, BLOCK_B, BLOCK_K
    )
    log_q = _scaled_log_softmax(s, inv_tau_s)
    log_p = _scaled_log_softmax(r, inv_tau_r)
    p = tl.exp(log_p)
    # 0 log 0 = 0: candidates the reader rules out (and padding) add nothing. Test p == 0, not
    # p > 0, so that a NaN p stays NaN instead of being dropped.
    kl = tl.where(p == 0.0, 0.0, p * (log_p - log_q))
    tl.store(loss_ptr + rows64, tl.sum(kl, axis=1), mask=row_ok)


@triton.jit
def _retrieval_kl_loss_bwd_kernel(
    grad_loss_ptr,
    s_ptr,
    r_ptr,
    grad_s_ptr,
    B,
    K,
    stride_g,
    stride_sb,
    stride_sk,
    stride_rb,
    stride_rk,
    inv_tau_s,
    inv_tau_r,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows64, cols, row_ok, mask, s, r = _load_rows(
        s_ptr, r_ptr, B, K, stride_sb, stride_sk, stride_rb, stride_rk, BLOCK_B, BLOCK_K
    )
    q = tl.exp(_scaled_log_softmax(s, inv_tau_s))
    p = tl.exp(_scaled_log_softmax(r, inv_tau_r))
    # stride_g is 0 when the upstream gradient is an expanded scalar (batchmean / sum).
    g = tl.load(grad_loss_ptr + rows64 * stride_g, mask=row_ok, other=0.0).to(tl.float32)
    grad = (q - p) * (g * inv_tau_s)[:, None]
    tl.store(grad_s_ptr + rows64[:, None] * K + cols[None, :], grad.to(grad_s_ptr.dtype.element_ty), mask=mask)


def _blocks(K: int, interpret: bool | None = None) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_K, num_warps). On a GPU: tiles of 1024 values, 4 per thread on 8 warps
    (s, r, q, p and 64-bit pointers per value are live at once: 4096-value tiles on 4 warps spill
    at K = 64, and 8 values per thread leave ptxas at 64 registers with a spill slot on sm_89),
    16 warps when one row alone is wider. Under the interpreter, whose cost is per program, as many rows as fit
    64k values."""
    interpret = interpreter_enabled() if interpret is None else interpret
    block_k = max(16, triton.next_power_of_2(K))
    budget = 65536 if interpret else 1024
    block_b = max(1, min(256, budget // block_k))
    return block_b, block_k, min(16, max(4, block_b * block_k // 128))


def _reader_fp32(reader_log_likelihoods: torch.Tensor) -> torch.Tensor:
    # The reader's log-likelihoods come from head_class_log_softmax in float32; another dtype is
    # cast once (B x K values) rather than compiled as another kernel variant.
    return reader_log_likelihoods if reader_log_likelihoods.dtype == torch.float32 else reader_log_likelihoods.float()


def retrieval_kl_loss_forward(
    retriever_scores: torch.Tensor, reader_log_likelihoods: torch.Tensor, tau_retriever: float, tau_reader: float
) -> torch.Tensor:
    """scores ``[B, K]`` (fp32/fp16/bf16), reader log-likelihoods ``[B, K]`` -> per-row loss float32 ``[B]``."""
    s, r = retriever_scores, _reader_fp32(reader_log_likelihoods)
    B, K = s.shape
    loss = torch.empty((B,), device=s.device, dtype=torch.float32)
    if B == 0:
        return loss
    block_b, block_k, num_warps = _blocks(K)
    _retrieval_kl_loss_fwd_kernel[(triton.cdiv(B, block_b),)](
        s,
        r,
        loss,
        B,
        K,
        s.stride(0),
        s.stride(1),
        r.stride(0),
        r.stride(1),
        1.0 / tau_retriever,
        1.0 / tau_reader,
        BLOCK_B=block_b,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return loss


def retrieval_kl_loss_backward(
    grad_loss: torch.Tensor,
    retriever_scores: torch.Tensor,
    reader_log_likelihoods: torch.Tensor,
    tau_retriever: float,
    tau_reader: float,
) -> torch.Tensor:
    """grad_loss ``[B]`` (any stride, 0 included) -> d scores ``[B, K]`` in the scores' dtype."""
    s, r = retriever_scores, _reader_fp32(reader_log_likelihoods)
    B, K = s.shape
    grad_s = torch.empty((B, K), device=s.device, dtype=s.dtype)
    if B == 0:
        return grad_s
    block_b, block_k, num_warps = _blocks(K)
    _retrieval_kl_loss_bwd_kernel[(triton.cdiv(B, block_b),)](
        grad_loss,
        s,
        r,
        grad_s,
        B,
        K,
        grad_loss.stride(0),
        s.stride(0),
        s.stride(1),
        r.stride(0),
        r.stride(1),
        1.0 / tau_retriever,
        1.0 / tau_reader,
        BLOCK_B=block_b,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return grad_s


def aot_specs() -> list[AotSpec]:
    """The configurations the launchers pick on a GPU, each as a launch of stage 2 on a batch of
    B = 2 queries (the authors' batch): for each score dtype, K = 16, the paper's K = 50, and
    K = 4096 (one row per program on 16 warps); contiguous scores and float32 log-likelihoods, and
    under ``batchmean`` an upstream gradient expanded from a scalar (stride 0)."""
    B, tau = 2, 1.0

    def forward(dtype: torch.dtype, K: int) -> None:
        s = torch.empty((B, K), dtype=dtype, device="meta")
        retrieval_kl_loss_forward(s, torch.empty((B, K), dtype=torch.float32, device="meta"), tau, tau)

    def backward(dtype: torch.dtype, K: int) -> None:
        s = torch.empty((B, K), dtype=dtype, device="meta")
        r = torch.empty((B, K), dtype=torch.float32, device="meta")
        grad_loss = torch.empty((), dtype=torch.float32, device="meta").expand(B)
        retrieval_kl_loss_backward(grad_loss, s, r, tau, tau)

    specs = []
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        for K in (16, 50, 4096):
            _, block_k, _ = _blocks(K, interpret=False)
            specs.append(
                AotSpec(
                    f"retrieval_kl_loss_fwd[{name},K<={block_k}]",
                    _retrieval_kl_loss_fwd_kernel,
                    launch=lambda dtype=dtype, K=K: forward(dtype, K),
                )
            )
            specs.append(
                AotSpec(
                    f"retrieval_kl_loss_bwd[{name},K<={block_k}]",
                    _retrieval_kl_loss_bwd_kernel,
                    launch=lambda dtype=dtype, K=K: backward(dtype, K),
                )
            )
    return specs
