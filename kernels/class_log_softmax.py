r"""Class-restricted log-softmax over a few vocabulary columns.

Given logits ``x`` ``[R, V]`` (R rows: any leading dims flattened) and C distinct class token ids
``ids`` ``[C]``, the reader's class-restricted posterior is

.. math::

    y_{r,c} = x_{r,\mathrm{ids}_c} - \log \sum_{c'} \exp x_{r,\mathrm{ids}_{c'}}

and its gradient is non-zero only in the class columns:

.. math::

    \frac{\partial L}{\partial x_{r,\mathrm{ids}_c}} = g_{r,c} - e^{y_{r,c}} \sum_{c'} g_{r,c'}.

Forward reads R x C logits (a gather), never the other V - C columns; backward writes the C class
columns of a zero-initialised ``[R, V]`` gradient. Statistics are kept in fp32 whatever the input
dtype.

Layout: kernels -> launchers -> ``aot_specs()``; the contract (shapes, dtypes, special values,
errors), the autograd wiring and the torch reference live in ``jomed_fast/ops/class_log_softmax.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import AotSpec, interpreter_enabled


@triton.jit
def _class_log_softmax_fwd_kernel(
    x_ptr,
    ids_ptr,
    out_ptr,
    R,
    C,
    stride_xr,
    stride_xv,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < R
    col_ok = cols < C
    ids = tl.load(ids_ptr + cols, mask=col_ok, other=0)
    mask = row_ok[:, None] & col_ok[None, :]
    # int64 offsets: R * V exceeds 2**31 for K=50 candidates x 152k vocab x a few rows.
    offs = rows.to(tl.int64)[:, None] * stride_xr + ids[None, :] * stride_xv
    x = tl.load(x_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
    row_max = tl.max(x, axis=1)
    shifted = x - row_max[:, None]
    lse = tl.log(tl.sum(tl.where(col_ok[None, :], tl.exp(shifted), 0.0), axis=1))
    y = shifted - lse[:, None]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], y, mask=mask)


@triton.jit
def _class_log_softmax_bwd_kernel(
    grad_out_ptr,
    out_ptr,
    ids_ptr,
    grad_x_ptr,
    R,
    C,
    stride_gr,
    stride_gv,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    offs_rc = rows.to(tl.int64)[:, None] * C + cols[None, :]
    g = tl.load(grad_out_ptr + offs_rc, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(out_ptr + offs_rc, mask=mask, other=float("-inf"))
    g_sum = tl.sum(g, axis=1)
    dx = g - tl.exp(y) * g_sum[:, None]
    ids = tl.load(ids_ptr + cols, mask=cols < C, other=0)
    offs = rows.to(tl.int64)[:, None] * stride_gr + ids[None, :] * stride_gv
    tl.store(grad_x_ptr + offs, dx.to(grad_x_ptr.dtype.element_ty), mask=mask)


def _blocks(C: int, interpret: bool | None = None) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps): about 4k fp32 values per program on a GPU; under the
    interpreter, whose cost is per program, as many rows as fit 64k values."""
    interpret = interpreter_enabled() if interpret is None else interpret
    block_c = max(16, triton.next_power_of_2(C))
    budget = 65536 if interpret else 4096
    block_r = max(1, min(256, budget // block_c))
    return block_r, block_c, 4 if block_c <= 1024 else 8


def class_log_softmax_forward(logits: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
    """logits ``[R, V]`` (fp32/fp16/bf16), class_ids int64 ``[C]`` -> float32 ``[R, C]``."""
    R, _ = logits.shape
    C = class_ids.numel()
    class_ids = class_ids.contiguous()  # the kernel reads ids at unit stride
    out = torch.empty((R, C), device=logits.device, dtype=torch.float32)
    if R == 0:
        return out
    block_r, block_c, num_warps = _blocks(C)
    _class_log_softmax_fwd_kernel[(triton.cdiv(R, block_r),)](
        logits,
        class_ids,
        out,
        R,
        C,
        logits.stride(0),
        logits.stride(1),
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return out


def class_log_softmax_backward(
    grad_out: torch.Tensor, out: torch.Tensor, class_ids: torch.Tensor, vocab_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """grad_out, out ``[R, C]`` -> grad of the logits ``[R, V]`` in ``dtype`` (zero off the class columns)."""
    R, C = out.shape
    grad_x = torch.zeros((R, vocab_size), device=out.device, dtype=dtype)
    if R == 0:
        return grad_x
    grad_out, class_ids = grad_out.contiguous(), class_ids.contiguous()
    block_r, block_c, num_warps = _blocks(C)
    _class_log_softmax_bwd_kernel[(triton.cdiv(R, block_r),)](
        grad_out,
        out.contiguous(),
        class_ids,
        grad_x,
        R,
        C,
        grad_x.stride(0),
        grad_x.stride(1),
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return grad_x


def aot_specs() -> list[AotSpec]:
    """Every configuration the launchers can pick on a GPU, each as a launch on the paper's reader
    (Qwen2-VL 7B: contiguous logits of V = 152064 for the K = 50 candidates of a query): each logits
    dtype x each class block, with C = 2 (Breast, closed VQA), 20, 200 and 1500 (wider label sets)."""
    vocab, rows = 152064, 50

    def forward(dtype: torch.dtype, C: int) -> None:
        logits = torch.empty((rows, vocab), dtype=dtype, device="meta")
        class_log_softmax_forward(logits, torch.empty(C, dtype=torch.int64, device="meta"))

    def backward(dtype: torch.dtype, C: int) -> None:
        out = torch.empty((rows, C), dtype=torch.float32, device="meta")
        ids = torch.empty(C, dtype=torch.int64, device="meta")
        class_log_softmax_backward(torch.empty_like(out), out, ids, vocab, dtype)

    specs = []
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        for C in (2, 20, 200, 1500):
            _, block_c, _ = _blocks(C, interpret=False)
            tag = f"{name},C<={block_c}"
            specs.append(
                AotSpec(
                    f"class_log_softmax_fwd[{tag}]",
                    _class_log_softmax_fwd_kernel,
                    launch=lambda dtype=dtype, C=C: forward(dtype, C),
                )
            )
            specs.append(
                AotSpec(
                    f"class_log_softmax_bwd[{tag}]",
                    _class_log_softmax_bwd_kernel,
                    launch=lambda dtype=dtype, C=C: backward(dtype, C),
                )
            )
    return specs
