"""``head_class_log_softmax``: the reader's class-restricted posterior straight from the LM head.

``head_class_log_softmax(hidden, weight, class_ids, bias=None)``: hidden ``[N, H]`` (fp32 / fp16 /
bf16), LM-head weight ``[V, H]`` (fp32 / fp16 / bf16; the real head is bf16 or fp16, and may differ
from hidden's dtype), class_ids int64 ``[C]`` distinct and in ``[0, V)``, optional bias ``[V]`` ->
float32 ``[N, C]``, the log-softmax over the C class logits of the head. The ``[N, V]`` logits are
never formed: only the C class rows of the head are read. ``head_class_log_softmax_reference``
(plain torch) is the specification; the tests hold both paths to it in float64.

Differentiable w.r.t. hidden, weight and bias (each only when it requires grad). The weight gradient
is a dense ``[V, H]`` tensor (what autograd accumulates into the parameter) that is exactly zero
outside the class rows; the bias gradient likewise ``[V]``. Gradients come back in each input's
dtype. NaN inputs propagate to NaN outputs; a row whose class logits are all ``-inf`` is NaN. A bad
argument is a ``TypeError`` / ``ValueError`` naming it; the class ids' values are checked inside
the op, which reads them.

Dispatch (``jomed_fast.ops``): CUDA tensors run the Triton kernels of
``jomed_fast.kernels.head_class_log_softmax``, whose docstring holds the math (forward and the
three gradients), the precision of each product and the FLOPs and bytes it saves; CPU tensors run
the torch path here. The backward's ``[N, C]`` part (``δ`` and the bias gradient) is plain torch in
the autograd rule, where torch.compile fuses it (a kernel launch would cost more than the
arithmetic); the two products that touch ``[N, H]`` and ``[C, H]`` are custom ops of their own, so
``torch.compile(fullgraph=True)`` traces the backward as well. Registered as
``torch.ops.jomed_fast.head_class_log_softmax`` (+ ``_backward_hidden``, ``_backward_weight``).
"""

from __future__ import annotations

from typing import Optional

import torch

from ._checks import check_class_ids, check_floating, check_ndim, check_same_device, check_tensor
from ._dispatch import choose_backend

_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def head_class_log_softmax_reference(
    hidden: torch.Tensor, weight: torch.Tensor, class_ids: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``log_softmax(hidden @ weight[class_ids].T + bias[class_ids])`` in at least fp32 (float64 for float64 input)."""
    dtype = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
    logits = hidden.to(dtype) @ weight[class_ids].to(dtype).T
    if bias is not None:
        logits = logits + bias[class_ids].to(dtype)
    return torch.log_softmax(logits, dim=-1)


@torch.library.custom_op("jomed_fast::head_class_log_softmax", mutates_args=())
def _forward(
    hidden: torch.Tensor, weight: torch.Tensor, class_ids: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """hidden ``[N, H]``, weight ``[V, H]``, bias ``[V]`` or None -> float32 ``[N, C]``."""
    # Value checks read the data, so they live inside the op (opaque to torch.compile).
    check_class_ids("class_ids", class_ids, weight.shape[0], weight.device)
    if choose_backend(hidden.device) == "triton":
        from jomed_fast.kernels.head_class_log_softmax import head_class_log_softmax_forward

        return head_class_log_softmax_forward(hidden, weight, class_ids, bias)
    return head_class_log_softmax_reference(hidden, weight, class_ids, bias).float()


@_forward.register_fake
def _(hidden, weight, class_ids, bias):
    return hidden.new_empty((hidden.shape[0], class_ids.shape[0]), dtype=torch.float32)


@torch.library.custom_op("jomed_fast::head_class_log_softmax_backward_hidden", mutates_args=())
def _backward_hidden(
    dlogits: torch.Tensor, weight: torch.Tensor, class_ids: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """dlogits float32 ``[N, C]`` -> d hidden ``[N, H]`` = dlogits @ weight[class_ids], in ``dtype``."""
    if choose_backend(dlogits.device) == "triton":
        from jomed_fast.kernels.head_class_log_softmax import head_class_log_softmax_backward_hidden

        return head_class_log_softmax_backward_hidden(dlogits, weight, class_ids, dtype)
    return (dlogits @ weight[class_ids].float()).to(dtype)


@_backward_hidden.register_fake
def _(dlogits, weight, class_ids, dtype):
    return dlogits.new_empty((dlogits.shape[0], weight.shape[1]), dtype=dtype)


@torch.library.custom_op("jomed_fast::head_class_log_softmax_backward_weight", mutates_args=())
def _backward_weight(
    dlogits: torch.Tensor, hidden: torch.Tensor, class_ids: torch.Tensor, vocab_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """dlogits float32 ``[N, C]`` -> d weight ``[V, H]`` in ``dtype``: dlogits^T @ hidden in the class rows, 0 elsewhere."""
    if choose_backend(dlogits.device) == "triton":
        from jomed_fast.kernels.head_class_log_softmax import head_class_log_softmax_backward_weight

        return head_class_log_softmax_backward_weight(dlogits, hidden, class_ids, vocab_size, dtype)
    grad = torch.zeros((vocab_size, hidden.shape[1]), dtype=dtype, device=dlogits.device)
    return grad.index_copy_(0, class_ids, (dlogits.T @ hidden.float()).to(dtype))


@_backward_weight.register_fake
def _(dlogits, hidden, class_ids, vocab_size, dtype):
    return dlogits.new_empty((vocab_size, hidden.shape[1]), dtype=dtype)


def _setup_context(ctx, inputs, output):
    hidden, weight, class_ids, bias = inputs
    ctx.save_for_backward(hidden, weight, class_ids, output)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward_rule(ctx, grad_out):
    hidden, weight, class_ids, out = ctx.saved_tensors
    needs_hidden, needs_weight, _, needs_bias = ctx.needs_input_grad
    grad_out = grad_out.float()
    # [N, C] only: δ = g - softmax * Σ_c g (torch; see the module docstring).
    dlogits = grad_out - out.exp() * grad_out.sum(dim=-1, keepdim=True)
    grad_hidden = _backward_hidden(dlogits, weight, class_ids, hidden.dtype) if needs_hidden else None
    grad_weight = _backward_weight(dlogits, hidden, class_ids, weight.shape[0], weight.dtype) if needs_weight else None
    grad_bias = None
    if needs_bias:
        grad_bias = torch.zeros(weight.shape[0], dtype=ctx.bias_dtype, device=dlogits.device)
        grad_bias = grad_bias.index_copy(0, class_ids, dlogits.sum(dim=0).to(ctx.bias_dtype))
    return grad_hidden, grad_weight, None, grad_bias


_forward.register_autograd(_backward_rule, setup_context=_setup_context)


def head_class_log_softmax(
    hidden: torch.Tensor, weight: torch.Tensor, class_ids: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Log-softmax over the C class logits of an LM head: ``[N, H]`` x ``[V, H]`` x ``[C]`` (+ ``[V]``) -> float32 ``[N, C]``."""
    check_floating("hidden", hidden, _INPUT_DTYPES)
    check_floating("weight", weight, _INPUT_DTYPES)
    if bias is not None:
        check_floating("bias", bias, _INPUT_DTYPES)
    check_tensor("class_ids", class_ids)
    check_ndim("hidden", hidden, 2, "N, H")
    check_ndim("weight", weight, 2, "V, H")
    N, H = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(
            f"weight: expected shape [V, H] with H={H} (the last dim of hidden), got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"bias: expected shape [V] with V={V} (the rows of weight), got {tuple(bias.shape)}")
    if class_ids.dtype != torch.int64:
        raise TypeError(f"class_ids: expected dtype int64, got {class_ids.dtype}")
    if class_ids.dim() != 1 or class_ids.shape[0] == 0:
        raise ValueError(f"class_ids: expected a non-empty 1-D tensor [C], got shape {tuple(class_ids.shape)}")
    check_same_device(hidden=hidden, weight=weight, class_ids=class_ids, bias=bias)
    return _forward(hidden, weight, class_ids, bias)
