r"""Class-restricted log-softmax fused with the LM head: only the C class rows of the head are used.

Given hidden states ``h`` ``[N, H]``, the LM-head weight ``W`` ``[V, H]``, an optional bias ``b``
``[V]`` and C distinct class token ids ``ids`` ``[C]``, write ``W_c = W[ids]`` ``[C, H]`` and

.. math::

    z_{n,c} = h_n \cdot W_{\mathrm{ids}_c} + b_{\mathrm{ids}_c}, \qquad
    y_{n,c} = z_{n,c} - \log \sum_{c'} \exp z_{n,c'}.

The full head would compute ``[N, V]`` logits (2·N·V·H FLOPs and N·V·4 bytes: 78 GFLOP and 30 MB
for N=50 candidates, V=152k, H=5120) to keep C of them. Here each program owns BLOCK_N rows,
streams H in BLOCK_H tiles, reads the C class rows of ``W`` straight from the head through row
pointers (no ``W[ids]`` copy in HBM), accumulates ``z`` ``[BLOCK_N, BLOCK_C]`` in fp32 with
``tl.dot`` and finishes the log-softmax in registers: 2·N·C·H FLOPs, N·H + C·H values read.

Backward, with ``g = dL/dy`` ``[N, C]``:

.. math::

    \delta_{n,c} = g_{n,c} - e^{y_{n,c}} \sum_{c'} g_{n,c'}, \qquad
    \frac{\partial L}{\partial h} = \delta\, W_c, \qquad
    \frac{\partial L}{\partial W_{\mathrm{ids}_c}} = \delta_{:,c}^{\top} h, \qquad
    \frac{\partial L}{\partial b_{\mathrm{ids}_c}} = \sum_n \delta_{n,c}.

``δ`` is ``[N, C]`` (a few hundred values) and is formed by torch in the autograd rule
(``jomed_fast/ops/head_class_log_softmax.py``); the two products that touch ``[N, H]`` and
``[C, H]`` are the kernels below. The weight gradient is scattered into the class rows of a
zero ``[V, H]`` tensor; the other V - C rows stay exactly zero.

Precision: in the forward, fp16/bf16 operands of the same dtype go to the tensor cores as they are
(exact products, fp32 accumulation, as the model's own LM head does); fp32 or mixed-dtype operands
are upcast to fp32 and multiplied with ``tl.dot(..., input_precision="tf32x3")``: each operand is
split into two TF32 terms and three tensor-core MMAs give about fp32 accuracy (plain TF32 would
not). The backward always multiplies that way: ``δ`` stays fp32 (rounding it to the head's 16 bits
would add a second rounding after the inputs' own), and a 16-bit operand is exact in TF32 (10
mantissa bits, fp16 has 10 and bf16 7). Under ``TRITON_INTERPRET=1`` bf16 forward operands are
upcast too, because the interpreter's bf16 dot is wrong (its fp16 dot is right, so fp16 tests
cover the 16-bit branch); the interpreter multiplies fp32 exactly, whatever the precision flag.

C up to 256 is fused in one pass (the grid has one class block); for larger C the kernel writes
raw logits over a grid of class blocks and the launcher applies ``torch.log_softmax`` to that
``[N, C]`` result, which is O(N·C) next to the kernel's O(N·C·H).

Layout: kernels -> launchers -> ``aot_specs()``; the contract (shapes, dtypes, special values,
errors), the autograd wiring and the torch reference live in ``jomed_fast/ops/head_class_log_softmax.py``.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._triton_utils import AotSpec, interpreter_enabled

MAX_FUSED_C = 256  # largest class block whose [BLOCK_N, BLOCK_C] logits stay in registers


@triton.jit
def _head_class_log_softmax_fwd_kernel(
    hidden_ptr,
    weight_ptr,
    ids_ptr,
    bias_ptr,
    out_ptr,
    N,
    H,
    C,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    HAS_BIAS: tl.constexpr,
    FUSE_SOFTMAX: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < N
    col_ok = cols < C
    ids = tl.load(ids_ptr + cols, mask=col_ok, other=0)
    offs_h = tl.arange(0, BLOCK_H)
    # int64 row offsets: ids * stride_wv reaches 152k * 5120 > 2**31 on a real head.
    h_rows = hidden_ptr + rows.to(tl.int64)[:, None] * stride_hn  # [BLOCK_N, 1]
    w_cols = weight_ptr + ids.to(tl.int64)[None, :] * stride_wv  # [1, BLOCK_C]: class rows read in place
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        k = h0 + offs_h
        k_ok = k < H
        # Masked lanes load 0, so the H tail and padded rows / classes add nothing to the dot.
        h = tl.load(h_rows + k[None, :] * stride_hh, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_cols + k[:, None] * stride_wh, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_F32:
            acc = tl.dot(h.to(tl.float32), w.to(tl.float32), acc, input_precision="tf32x3")
        else:
            acc = tl.dot(h, w, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + ids, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if FUSE_SOFTMAX:
        # All C classes are in this block: finish the log-softmax in registers.
        z = tl.where(col_ok[None, :], acc, float("-inf"))
        row_max = tl.max(z, axis=1)
        shifted = z - row_max[:, None]
        lse = tl.log(tl.sum(tl.where(col_ok[None, :], tl.exp(shifted), 0.0), axis=1))
        acc = shifted - lse[:, None]
    out_offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    tl.store(out_ptr + out_offs, acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _head_class_log_softmax_bwd_hidden_kernel(
    dlogits_ptr,
    weight_ptr,
    ids_ptr,
    grad_hidden_ptr,
    N,
    H,
    C,
    stride_wv,
    stride_wh,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """grad_hidden[n, :] = sum_c dlogits[n, c] * W[ids_c, :]  (grad_hidden contiguous [N, H])."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    hcols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < N
    h_ok = hcols < H
    acc = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        dl = tl.load(
            dlogits_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :],
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        ids = tl.load(ids_ptr + cols, mask=col_ok, other=0)
        w = tl.load(
            weight_ptr + ids.to(tl.int64)[:, None] * stride_wv + hcols[None, :] * stride_wh,
            mask=col_ok[:, None] & h_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(dl, w.to(tl.float32), acc, input_precision="tf32x3")
    offs = rows.to(tl.int64)[:, None] * H + hcols[None, :]
    tl.store(grad_hidden_ptr + offs, acc.to(grad_hidden_ptr.dtype.element_ty), mask=row_ok[:, None] & h_ok[None, :])


@triton.jit
def _head_class_log_softmax_bwd_weight_kernel(
    dlogits_ptr,
    hidden_ptr,
    ids_ptr,
    grad_weight_ptr,
    N,
    H,
    C,
    stride_hn,
    stride_hh,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """grad_weight[ids_c, :] = sum_n dlogits[n, c] * hidden[n, :]  (grad_weight contiguous [V, H],
    zero-initialised; each class row is written by exactly one program column, ids being distinct)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    hcols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < C
    h_ok = hcols < H
    acc = tl.zeros((BLOCK_C, BLOCK_H), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        # dlogits read transposed, [BLOCK_C, BLOCK_N], so the reduction over N is the dot's K.
        dl_t = tl.load(
            dlogits_ptr + rows.to(tl.int64)[None, :] * C + cols[:, None],
            mask=col_ok[:, None] & row_ok[None, :],
            other=0.0,
        )
        h = tl.load(
            hidden_ptr + rows.to(tl.int64)[:, None] * stride_hn + hcols[None, :] * stride_hh,
            mask=row_ok[:, None] & h_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(dl_t, h.to(tl.float32), acc, input_precision="tf32x3")
    ids = tl.load(ids_ptr + cols, mask=col_ok, other=0)
    offs = ids.to(tl.int64)[:, None] * H + hcols[None, :]
    tl.store(grad_weight_ptr + offs, acc.to(grad_weight_ptr.dtype.element_ty), mask=col_ok[:, None] & h_ok[None, :])


@dataclasses.dataclass(frozen=True)
class _Blocks:
    block_n: int
    block_c: int
    block_h: int
    num_warps: int = 4
    num_stages: int = 3


def _class_block(C: int, cap: int) -> int:
    # tl.dot needs every dimension >= 16.
    return max(16, min(cap, triton.next_power_of_2(C)))


def _fwd_blocks(C: int, dot_f32: bool, interpret: bool | None = None) -> _Blocks:
    """Forward tiles. GPU: small BLOCK_N, since N (B x K candidates) is often only tens of rows and
    each program streams all of H; 16-bit operands take 128-wide H tiles, fp32 ones (split into
    TF32 hi/lo parts, register-hungry) 32-wide ones, so no config spills or passes the L40's 99 KB
    of shared memory. Interpreter (cost per program and per loop step): large tiles, so small test
    shapes run in one or two programs."""
    interpret = interpreter_enabled() if interpret is None else interpret
    block_c = _class_block(C, MAX_FUSED_C)
    if interpret:
        return _Blocks(64, block_c, 256, num_warps=1, num_stages=1)
    if block_c <= 64:
        return _Blocks(32, block_c, 32 if dot_f32 else 128, num_warps=4)
    if dot_f32:
        return _Blocks(16, block_c, 32, num_warps=8, num_stages=2)
    # 16-bit, wide class block: H tiles of 32 keep the staged W rows and accumulators in registers.
    return _Blocks(16, block_c, 64 if block_c <= 128 else 32, num_warps=4 if block_c <= 128 else 8)


def _bwd_blocks(C: int, interpret: bool | None = None) -> _Blocks:
    """Backward tiles: output tiles [BLOCK_N, BLOCK_H] (hidden grad) and [BLOCK_C, BLOCK_H] (weight
    grad), looping over the short class / row dimension. Interpreter: large tiles, as in the forward."""
    interpret = interpreter_enabled() if interpret is None else interpret
    if interpret:
        return _Blocks(64, _class_block(C, MAX_FUSED_C), 256, num_warps=1, num_stages=1)
    return _Blocks(32, _class_block(C, 32), 64, num_warps=4)


def _dot_in_f32(*dtypes: torch.dtype) -> bool:
    """Forward dot as the operands come for matching fp16/bf16; fp32 or mixed dtypes -> fp32 (tf32x3).
    Under the interpreter bf16 is upcast too (its bf16 dot is wrong); its fp16 dot is right, which
    keeps the 16-bit branch under test on CPU."""
    if len(set(dtypes)) > 1 or dtypes[0] == torch.float32:
        return True
    return dtypes[0] == torch.bfloat16 and interpreter_enabled()


def head_class_log_softmax_forward(
    hidden: torch.Tensor, weight: torch.Tensor, class_ids: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """hidden ``[N, H]``, weight ``[V, H]``, class_ids int64 ``[C]``, bias ``[V]`` or None -> float32 ``[N, C]``."""
    N, H = hidden.shape
    C = class_ids.numel()
    out = torch.empty((N, C), device=hidden.device, dtype=torch.float32)
    if N == 0:
        return out
    class_ids = class_ids.contiguous()
    dot_f32 = _dot_in_f32(hidden.dtype, weight.dtype)
    blocks = _fwd_blocks(C, dot_f32)
    fuse = C <= blocks.block_c
    grid = (triton.cdiv(N, blocks.block_n), triton.cdiv(C, blocks.block_c))
    _head_class_log_softmax_fwd_kernel[grid](
        hidden,
        weight,
        class_ids,
        weight if bias is None else bias,
        out,
        N,
        H,
        C,
        hidden.stride(0),
        hidden.stride(1),
        weight.stride(0),
        weight.stride(1),
        HAS_BIAS=bias is not None,
        FUSE_SOFTMAX=fuse,
        DOT_F32=dot_f32,
        BLOCK_N=blocks.block_n,
        BLOCK_C=blocks.block_c,
        BLOCK_H=blocks.block_h,
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
    )
    if not fuse:
        # C > MAX_FUSED_C: out holds raw logits; normalising [N, C] is O(N*C) beside the kernel's O(N*C*H).
        out = torch.log_softmax(out, dim=-1)
    return out


def head_class_log_softmax_backward_hidden(
    dlogits: torch.Tensor, weight: torch.Tensor, class_ids: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """dlogits float32 ``[N, C]`` -> grad of hidden ``[N, H]`` in ``dtype`` = dlogits @ weight[class_ids]."""
    N, C = dlogits.shape
    H = weight.shape[1]
    grad_hidden = torch.empty((N, H), device=dlogits.device, dtype=dtype)
    if N == 0 or H == 0:
        return grad_hidden.zero_()
    blocks = _bwd_blocks(C)
    grid = (triton.cdiv(N, blocks.block_n), triton.cdiv(H, blocks.block_h))
    _head_class_log_softmax_bwd_hidden_kernel[grid](
        dlogits.contiguous(),
        weight,
        class_ids.contiguous(),
        grad_hidden,
        N,
        H,
        C,
        weight.stride(0),
        weight.stride(1),
        BLOCK_N=blocks.block_n,
        BLOCK_C=blocks.block_c,
        BLOCK_H=blocks.block_h,
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
    )
    return grad_hidden


def head_class_log_softmax_backward_weight(
    dlogits: torch.Tensor, hidden: torch.Tensor, class_ids: torch.Tensor, vocab_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """dlogits float32 ``[N, C]`` -> grad of the weight ``[V, H]`` in ``dtype``: dlogits^T @ hidden in
    the class rows, zero elsewhere."""
    N, C = dlogits.shape
    H = hidden.shape[1]
    grad_weight = torch.zeros((vocab_size, H), device=dlogits.device, dtype=dtype)
    if N == 0 or H == 0:
        return grad_weight
    blocks = _bwd_blocks(C)
    grid = (triton.cdiv(C, blocks.block_c), triton.cdiv(H, blocks.block_h))
    _head_class_log_softmax_bwd_weight_kernel[grid](
        dlogits.contiguous(),
        hidden,
        class_ids.contiguous(),
        grad_weight,
        N,
        H,
        C,
        hidden.stride(0),
        hidden.stride(1),
        BLOCK_N=blocks.block_n,
        BLOCK_C=blocks.block_c,
        BLOCK_H=blocks.block_h,
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
    )
    return grad_weight


def aot_specs() -> list[AotSpec]:
    """The GPU configurations the launchers pick, each as a launch on the paper's reader (Qwen2-VL
    7B: a [V = 152064, H = 3584] head, contiguous hidden states of the K = 50 candidates of a
    query): per dtype, a binary task (C = 2) and a 200-class one in the largest fused block (256);
    with bias for bf16 (the real head's dtype; the bias is one epilogue load); the unfused C > 256
    path (C = 1000); fp32 hidden on a bf16 head; both backward kernels."""
    vocab, hidden_size, rows = 152064, 3584, 50

    def meta(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device="meta")

    def forward(hidden_dtype: torch.dtype, weight_dtype: torch.dtype, C: int, has_bias: bool) -> None:
        head_class_log_softmax_forward(
            meta((rows, hidden_size), hidden_dtype),
            meta((vocab, hidden_size), weight_dtype),
            meta((C,), torch.int64),
            meta((vocab,), weight_dtype) if has_bias else None,
        )

    def backward_hidden(dtype: torch.dtype, C: int) -> None:
        head_class_log_softmax_backward_hidden(
            meta((rows, C), torch.float32), meta((vocab, hidden_size), dtype), meta((C,), torch.int64), dtype
        )

    def backward_weight(dtype: torch.dtype, C: int) -> None:
        head_class_log_softmax_backward_weight(
            meta((rows, C), torch.float32), meta((rows, hidden_size), dtype), meta((C,), torch.int64), vocab, dtype
        )

    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    f32, f16, b16 = torch.float32, torch.float16, torch.bfloat16
    specs = []
    for hidden_dtype, weight_dtype, C, has_bias in [
        (f32, f32, 2, False),
        (f32, f32, 200, False),
        (f16, f16, 2, False),
        (f16, f16, 200, False),
        (b16, b16, 2, False),
        (b16, b16, 200, False),
        (b16, b16, 2, True),
        (b16, b16, 200, True),
        (b16, b16, 1000, False),  # C > 256: grid over class blocks, raw logits
        (f32, b16, 2, False),  # mixed: upcast to fp32
    ]:
        dot_f32 = hidden_dtype != weight_dtype or hidden_dtype == f32
        blocks = _fwd_blocks(C, dot_f32, interpret=False)
        fuse = C <= blocks.block_c
        h, w = names[hidden_dtype], names[weight_dtype]
        dtypes = h if h == w else f"{h} hidden,{w} weight"
        classes = f"C<={blocks.block_c}" if fuse else f"C>{MAX_FUSED_C} unfused"
        specs.append(
            AotSpec(
                f"head_class_log_softmax_fwd[{dtypes},{classes},bias={int(has_bias)}]",
                _head_class_log_softmax_fwd_kernel,
                launch=lambda h=hidden_dtype, w=weight_dtype, C=C, b=has_bias: forward(h, w, C, b),
            )
        )

    for dtype, C in [(f32, 2), (f32, 200), (f16, 2), (b16, 2), (b16, 200)]:
        blocks = _bwd_blocks(C, interpret=False)
        specs.append(
            AotSpec(
                f"head_class_log_softmax_bwd_hidden[{names[dtype]},C<={blocks.block_c} per step]",
                _head_class_log_softmax_bwd_hidden_kernel,
                launch=lambda dtype=dtype, C=C: backward_hidden(dtype, C),
            )
        )
        specs.append(
            AotSpec(
                f"head_class_log_softmax_bwd_weight[{names[dtype]},C<={blocks.block_c} per block]",
                _head_class_log_softmax_bwd_weight_kernel,
                launch=lambda dtype=dtype, C=C: backward_weight(dtype, C),
            )
        )
    return specs
