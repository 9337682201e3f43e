"""``class_log_softmax``: the reader's posterior restricted to the task's class tokens.

``class_log_softmax(logits, class_ids)``: logits ``[..., V]`` (fp32 / fp16 / bf16), class_ids int64
``[C]`` distinct and in ``[0, V)`` -> float32 ``[..., C]``, the log-softmax over the C class columns
alone. ``class_log_softmax_reference`` (plain torch) is the specification; the tests hold both
paths to it in float64. Differentiable w.r.t. the logits: the gradient comes back in their dtype
and is exactly zero outside the class columns. NaN logits propagate to NaN outputs; a row whose
class logits are all ``-inf`` is NaN. A bad argument is a ``TypeError`` / ``ValueError`` naming it;
the class ids' values (range, duplicates) are checked inside the op, which reads them.

Dispatch (``jomed_fast.ops``): CUDA tensors run the Triton kernels of
``jomed_fast.kernels.class_log_softmax``, whose docstring holds the math of both directions and
the memory traffic; CPU tensors run the torch path here. Registered as
``torch.ops.jomed_fast.class_log_softmax`` (backward: ``class_log_softmax_backward``) so callers
compile under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch

from ._checks import check_class_ids, check_floating, check_tensor
from ._dispatch import choose_backend

_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def class_log_softmax_reference(logits: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits[..., class_ids])``, computed in at least fp32 (in float64 for float64 input)."""
    selected = logits[..., class_ids]
    return torch.log_softmax(selected.to(torch.promote_types(selected.dtype, torch.float32)), dim=-1)


@torch.library.custom_op("jomed_fast::class_log_softmax", mutates_args=())
def _forward(logits: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
    """logits ``[R, V]`` -> float32 ``[R, C]``."""
    # Value checks read the data, so they live inside the op (opaque to torch.compile).
    check_class_ids("class_ids", class_ids, logits.shape[-1], logits.device)
    if choose_backend(logits.device) == "triton":
        from jomed_fast.kernels.class_log_softmax import class_log_softmax_forward

        return class_log_softmax_forward(logits, class_ids)
    return class_log_softmax_reference(logits, class_ids).float()


@_forward.register_fake
def _(logits, class_ids):
    return logits.new_empty((logits.shape[0], class_ids.shape[0]), dtype=torch.float32)


@torch.library.custom_op("jomed_fast::class_log_softmax_backward", mutates_args=())
def _backward(
    grad_out: torch.Tensor, out: torch.Tensor, class_ids: torch.Tensor, vocab_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """grad_out, out ``[R, C]`` -> d logits ``[R, V]`` in ``dtype``, zero off the class columns (the formula:
    ``jomed_fast.kernels.class_log_softmax``)."""
    if choose_backend(out.device) == "triton":
        from jomed_fast.kernels.class_log_softmax import class_log_softmax_backward

        return class_log_softmax_backward(grad_out, out, class_ids, vocab_size, dtype)
    grad_classes = grad_out - out.exp() * grad_out.sum(dim=-1, keepdim=True)
    grad = torch.zeros((out.shape[0], vocab_size), dtype=dtype, device=out.device)
    return grad.index_copy_(1, class_ids, grad_classes.to(dtype))


@_backward.register_fake
def _(grad_out, out, class_ids, vocab_size, dtype):
    return out.new_empty((out.shape[0], vocab_size), dtype=dtype)


def _setup_context(ctx, inputs, output):
    logits, class_ids = inputs
    ctx.save_for_backward(output, class_ids)
    ctx.vocab_size = logits.shape[-1]
    ctx.dtype = logits.dtype


def _backward_rule(ctx, grad_out):
    out, class_ids = ctx.saved_tensors
    return _backward(grad_out.float(), out, class_ids, ctx.vocab_size, ctx.dtype), None


_forward.register_autograd(_backward_rule, setup_context=_setup_context)


def class_log_softmax(logits: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
    """Log-softmax of ``logits[..., class_ids]``: ``[..., V]`` x ``[C]`` -> float32 ``[..., C]``."""
    check_floating("logits", logits, _INPUT_DTYPES)
    check_tensor("class_ids", class_ids)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits: expected shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    if class_ids.dtype != torch.int64:
        raise TypeError(f"class_ids: expected dtype int64, got {class_ids.dtype}")
    if class_ids.dim() != 1 or class_ids.shape[0] == 0:
        raise ValueError(f"class_ids: expected a non-empty 1-D tensor [C], got shape {tuple(class_ids.shape)}")
    if class_ids.device != logits.device:
        raise ValueError(
            f"class_ids: expected a tensor on {logits.device} (the device of logits), got {class_ids.device}"
        )
    lead, vocab_size = logits.shape[:-1], logits.shape[-1]
    out = _forward(logits.reshape(-1, vocab_size), class_ids)
    return out.reshape(*lead, class_ids.shape[0])
