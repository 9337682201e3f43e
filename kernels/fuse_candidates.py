r"""Candidate fusion (JOMED's inference rule), fused forward and backward.

For each query b, the reader's class log-probabilities given each of its K candidates
``l`` ``[B, K, C]`` and the retriever scores ``s`` ``[B, K]`` fuse to

.. math::

    y_{b,c} = \sum_k e^{l_{b,k,c}} \, w_{b,k}, \qquad
    w_{b,k} = \operatorname{softmax}_k(s_{b,k} / \tau).

Each term is computed as :math:`t_{b,k,c} = \exp(l_{b,k,c} + \log w_{b,k})`, one exp per element
and no overflow of :math:`e^{l}` before the weight scales it down. With :math:`g` the upstream
gradient ``[B, C]`` and :math:`a_{b,k} = \sum_c g_{b,c} t_{b,k,c}`,

.. math::

    \frac{\partial L}{\partial l_{b,k,c}} = g_{b,c}\, t_{b,k,c}, \qquad
    \frac{\partial L}{\partial s_{b,k}} = \frac{a_{b,k} - w_{b,k} \sum_{j} a_{b,j}}{\tau}

(the softmax Jacobian applied to :math:`\partial L / \partial w_{b,k} = \sum_c g_{b,c} e^{l_{b,k,c}}
= a_{b,k} / w_{b,k}`, written without the division so that ``w = 0`` is harmless).

``log w`` is ``(s - max_k s) / tau - lse``: shifting before the division keeps fp32 precision at
``|s| ~ 1e4`` and small tau. Accumulation is fp32 whatever the input dtype.

Design: one program per block of BLOCK_B queries; the K weights of each query stay in registers
(BLOCK_K = next power of two of K) and the classes are walked in ``[BLOCK_B, BLOCK_K, BLOCK_C]``
tiles, so any C works and ``l`` is read once. Shipped and checked for spills up to K = 2048
(``aot_specs``); a wider K compiles a wider tile on demand. The backward recomputes ``t`` from the
saved inputs (it must read ``l`` anyway, so recomputing costs one exp per element and no memory),
writes ``dl`` tile by tile while accumulating ``a`` on chip, then writes ``ds`` once.

Layout: kernels -> launchers -> ``aot_specs()``; the contract (shapes, dtypes, special values,
errors), the autograd wiring and the torch reference live in ``jomed_fast/ops/fuse_candidates.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import AotSpec, interpreter_enabled


@triton.jit
def _log_weights(s_ptr, B, K, stride_sb, stride_sk, inv_tau, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """rows (int64), k offsets, masks and ``log softmax(s / tau)`` ``[BLOCK_B, BLOCK_K]`` (padding: -inf)."""
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)  # B * K * C can pass 2**31
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < B
    k_ok = ks < K
    s = tl.load(
        s_ptr + rows[:, None] * stride_sb + ks[None, :] * stride_sk,
        mask=row_ok[:, None] & k_ok[None, :],
        other=float("-inf"),
    ).to(tl.float32)
    row_max = tl.max(s, axis=1)
    z = (s - row_max[:, None]) * inv_tau  # shift, then scale (see the module docstring)
    log_w = z - tl.log(tl.sum(tl.exp(z), axis=1))[:, None]
    return rows, ks, row_ok, k_ok, log_w


@triton.jit
def _fuse_candidates_fwd_kernel(
    l_ptr,
    s_ptr,
    out_ptr,
    B,
    K,
    C,
    stride_lb,
    stride_lk,
    stride_lc,
    stride_sb,
    stride_sk,
    inv_tau,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows, ks, row_ok, k_ok, log_w = _log_weights(s_ptr, B, K, stride_sb, stride_sk, inv_tau, BLOCK_B, BLOCK_K)
    bk_ok = row_ok[:, None, None] & k_ok[None, :, None]
    l_base = l_ptr + rows[:, None, None] * stride_lb + ks[None, :, None] * stride_lk
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_ok = cs < C
        l = tl.load(l_base + cs[None, None, :] * stride_lc, mask=bk_ok & c_ok[None, None, :], other=float("-inf")).to(
            tl.float32
        )
        # Padding: exp(-inf + -inf) = 0, so it adds nothing to the sum over k.
        y = tl.sum(tl.exp(l + log_w[:, :, None]), axis=1)
        tl.store(out_ptr + rows[:, None] * C + cs[None, :], y, mask=row_ok[:, None] & c_ok[None, :])


@triton.jit
def _fuse_candidates_bwd_kernel(
    grad_out_ptr,
    l_ptr,
    s_ptr,
    grad_l_ptr,
    grad_s_ptr,
    B,
    K,
    C,
    stride_gb,
    stride_gc,
    stride_lb,
    stride_lk,
    stride_lc,
    stride_sb,
    stride_sk,
    inv_tau,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows, ks, row_ok, k_ok, log_w = _log_weights(s_ptr, B, K, stride_sb, stride_sk, inv_tau, BLOCK_B, BLOCK_K)
    bk_ok = row_ok[:, None, None] & k_ok[None, :, None]
    l_base = l_ptr + rows[:, None, None] * stride_lb + ks[None, :, None] * stride_lk
    # grad_l is a fresh contiguous [B, K, C].
    gl_base = grad_l_ptr + rows[:, None, None] * K * C + ks[None, :, None] * C
    a = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_ok = cs < C
        mask = bk_ok & c_ok[None, None, :]
        l = tl.load(l_base + cs[None, None, :] * stride_lc, mask=mask, other=float("-inf")).to(tl.float32)
        # Strides, not a copy: the upstream gradient of a .sum() is an expanded tensor of stride 0.
        g = tl.load(
            grad_out_ptr + rows[:, None] * stride_gb + cs[None, :] * stride_gc,
            mask=row_ok[:, None] & c_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        dl = g[:, None, :] * tl.exp(l + log_w[:, :, None])
        tl.store(gl_base + cs[None, None, :], dl.to(grad_l_ptr.dtype.element_ty), mask=mask)
        a += tl.sum(dl, axis=2)
    ds = (a - tl.exp(log_w) * tl.sum(a, axis=1)[:, None]) * inv_tau
    tl.store(grad_s_ptr + rows[:, None] * K + ks[None, :], ds, mask=row_ok[:, None] & k_ok[None, :])


def _blocks(K: int, C: int, interpret: bool | None = None) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_K, BLOCK_C, num_warps). K is held whole, C walked in chunks. On a GPU: tiles
    of about 1024 values, 4 per thread on 8 warps (the backward keeps l, g, dl, the K-wide log w and
    a, and two 64-bit pointer tiles live; 4096-value tiles spill, and so does sm_89 at 8 values per
    thread), 16 warps when K alone is wider. Under the interpreter, whose cost is per program,
    tiles of 64k values."""
    interpret = interpreter_enabled() if interpret is None else interpret
    budget = 65536 if interpret else 1024
    block_k = max(2, triton.next_power_of_2(K))
    block_c = max(2, min(triton.next_power_of_2(C), budget // block_k))
    block_b = max(1, min(256, budget // (block_k * block_c)))
    return block_b, block_k, block_c, min(16, max(4, block_b * block_k * block_c // 128))


def _scores_fp32(retriever_scores: torch.Tensor) -> torch.Tensor:
    # topk_similarity returns float32 scores; another dtype is cast once (B x K values) rather
    # than compiled as another kernel variant.
    return retriever_scores if retriever_scores.dtype == torch.float32 else retriever_scores.float()


def fuse_candidates_forward(
    candidate_log_probs: torch.Tensor, retriever_scores: torch.Tensor, tau: float
) -> torch.Tensor:
    """candidate_log_probs ``[B, K, C]`` (fp32/fp16/bf16), scores ``[B, K]`` -> float32 ``[B, C]``."""
    lp, s = candidate_log_probs, _scores_fp32(retriever_scores)
    B, K, C = lp.shape
    out = torch.empty((B, C), device=lp.device, dtype=torch.float32)
    if B == 0:
        return out
    block_b, block_k, block_c, num_warps = _blocks(K, C)
    _fuse_candidates_fwd_kernel[(triton.cdiv(B, block_b),)](
        lp,
        s,
        out,
        B,
        K,
        C,
        lp.stride(0),
        lp.stride(1),
        lp.stride(2),
        s.stride(0),
        s.stride(1),
        1.0 / tau,
        BLOCK_B=block_b,
        BLOCK_K=block_k,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return out


def fuse_candidates_backward(
    grad_out: torch.Tensor, candidate_log_probs: torch.Tensor, retriever_scores: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_out ``[B, C]`` (any strides) -> (d candidate_log_probs ``[B, K, C]``, d scores ``[B, K]``),
    each in its input's dtype."""
    lp, s = candidate_log_probs, _scores_fp32(retriever_scores)
    B, K, C = lp.shape
    grad_l = torch.empty((B, K, C), device=lp.device, dtype=lp.dtype)
    grad_s = torch.empty((B, K), device=lp.device, dtype=torch.float32)
    if B > 0:
        block_b, block_k, block_c, num_warps = _blocks(K, C)
        _fuse_candidates_bwd_kernel[(triton.cdiv(B, block_b),)](
            grad_out,
            lp,
            s,
            grad_l,
            grad_s,
            B,
            K,
            C,
            grad_out.stride(0),
            grad_out.stride(1),
            lp.stride(0),
            lp.stride(1),
            lp.stride(2),
            s.stride(0),
            s.stride(1),
            1.0 / tau,
            BLOCK_B=block_b,
            BLOCK_K=block_k,
            BLOCK_C=block_c,
            num_warps=num_warps,
        )
    return grad_l, grad_s.to(retriever_scores.dtype)


def aot_specs() -> list[AotSpec]:
    """The configurations the launchers pick on a GPU, each as a launch at inference on a batch of
    B = 16 queries, for each log-prob dtype: the paper's K = 50 with a binary task (8 queries per
    program) and a 100-way task (one query, the class loop), and K = 2048 candidates of one class
    (one query on 16 warps; C = 1 makes the class stride and count constants, as the JIT sees them);
    contiguous log-probabilities, float32 scores (as top-k returns them) and a contiguous upstream
    gradient."""
    B, tau = 16, 1.0

    def inputs(dtype: torch.dtype, K: int, C: int) -> tuple[torch.Tensor, torch.Tensor]:
        lp = torch.empty((B, K, C), dtype=dtype, device="meta")
        return lp, torch.empty((B, K), dtype=torch.float32, device="meta")

    def forward(dtype: torch.dtype, K: int, C: int) -> None:
        fuse_candidates_forward(*inputs(dtype, K, C), tau)

    def backward(dtype: torch.dtype, K: int, C: int) -> None:
        grad_out = torch.empty((B, C), dtype=torch.float32, device="meta")
        fuse_candidates_backward(grad_out, *inputs(dtype, K, C), tau)

    specs = []
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        for K, C in ((50, 2), (50, 100), (2048, 1)):
            block_b, block_k, block_c, _ = _blocks(K, C, interpret=False)
            tag = f"{name},K<={block_k},BLOCK_B={block_b},BLOCK_C={block_c}"
            specs.append(
                AotSpec(
                    f"fuse_candidates_fwd[{tag}]",
                    _fuse_candidates_fwd_kernel,
                    launch=lambda dtype=dtype, K=K, C=C: forward(dtype, K, C),
                )
            )
            specs.append(
                AotSpec(
                    f"fuse_candidates_bwd[{tag}]",
                    _fuse_candidates_bwd_kernel,
                    launch=lambda dtype=dtype, K=K, C=C: backward(dtype, K, C),
                )
            )
    return specs
