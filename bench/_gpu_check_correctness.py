"""The GPU check's correctness step: one op at one dtype against its float64 reference, on any device.

``check(step, shapes, device)`` builds the step's inputs (seeded), runs the op of ``jomed_fast.ops``
(CUDA tensors: its Triton kernel), backpropagates a random output gradient where the op has one,
and compares every output and gradient with the op's ``*_reference`` on the same (rounded) inputs
in float64, elementwise: ``|a - b| <= atol + rtol |b|``, the CPU tests' tolerances
(``_gpu_check_plan.TOLERANCES``). Where the reference would not fit at the paper's sizes it runs on
the part that matters: the head's C class rows, the top-k's float64 scores chunk by chunk. The
tests run it on the CPU at small sizes; the GPU run at the paper's.
"""

from __future__ import annotations

import torch

from bench._gpu_check_steps import DRAW_CHUNK, TOLERANCES, TOPK_SCORE_TOLERANCE, Shapes, Step
from jomed_fast import ops

# Temperatures of the checks: a sharp reader posterior (tau_reader < 1) as stage 2 uses.
TAU_RETRIEVER, TAU_READER, TAU_FUSE = 1.0, 0.1, 1.0


def compare(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> tuple[float, bool]:
    """(max |actual - expected|, every element within ``atol + rtol |expected|`` and no NaN)."""
    a, b = actual.detach().double(), expected.detach().double()
    diff = (a - b).abs()
    if diff.numel() == 0:
        return 0.0, True
    ok = bool((diff <= atol + rtol * b.abs()).all())  # a NaN difference compares False
    return float(diff.max()), ok


def _randn(shape, gen, device, dtype=torch.float32, scale=1.0):
    return (torch.randn(shape, generator=gen, device=device) * scale).to(dtype)


def _result(step: Step, atol: float, rtol: float, errors: dict[str, tuple[float, bool]]) -> dict:
    return {
        "name": step.name,
        "op": step.op,
        "dtype": step.dtype,
        "dims": dict(step.dims),
        "atol": atol,
        "rtol": rtol,
        "max_abs_error": {k: v[0] for k, v in errors.items()},
        "within": {k: v[1] for k, v in errors.items()},
        "passed": all(v[1] for v in errors.values()),
    }


def _class_log_softmax(step: Step, gen, device, dtype, atol, rtol):
    R, V, C = step.dims["R"], step.dims["V"], step.dims["C"]
    logits = _randn((R, V), gen, device, dtype, 3.0).requires_grad_(True)
    ids = torch.randperm(V, generator=gen, device=device)[:C]
    out = ops.class_log_softmax(logits, ids)
    grad_out = _randn((R, C), gen, device)
    out.backward(grad_out)
    selected = logits.detach()[:, ids].double().requires_grad_(True)
    ref = ops.class_log_softmax_reference(selected, torch.arange(C, device=device))
    ref.backward(grad_out.double())
    grad = logits.grad
    errors = {
        "out": compare(out, ref, atol, rtol),
        "d logits (classes)": compare(grad[:, ids], selected.grad, atol, rtol),
    }
    off = grad.index_fill_(1, ids, 0).abs().max()  # exactly zero off the class columns
    errors["d logits (other columns)"] = (float(off), bool(off == 0))
    return errors


def _head_class_log_softmax(step: Step, gen, device, dtype, atol, rtol):
    N, H, V, C = step.dims["N"], step.dims["H"], step.dims["V"], step.dims["C"]
    hidden = _randn((N, H), gen, device, dtype).requires_grad_(True)
    weight = torch.randn((V, H), generator=gen, device=device, dtype=dtype).mul_(H**-0.5).requires_grad_(True)
    ids = torch.randperm(V, generator=gen, device=device)[:C]
    out = ops.head_class_log_softmax(hidden, weight, ids)
    grad_out = _randn((N, C), gen, device)
    out.backward(grad_out)
    # The reference sees the C class rows only: the [N, V] logits (and a float64 [V, H]) are what the
    # op avoids, and its weight gradient outside those rows must be exactly zero.
    h64 = hidden.detach().double().requires_grad_(True)
    rows64 = weight.detach()[ids].double().requires_grad_(True)
    ref = ops.head_class_log_softmax_reference(h64, rows64, torch.arange(C, device=device))
    ref.backward(grad_out.double())
    grad_w = weight.grad
    errors = {
        "out": compare(out, ref, atol, rtol),
        "d hidden": compare(hidden.grad, h64.grad, atol, rtol),
        "d weight (class rows)": compare(grad_w[ids], rows64.grad, atol, rtol),
    }
    off = grad_w.index_fill_(0, ids, 0).abs().max()
    errors["d weight (other rows)"] = (float(off), bool(off == 0))
    return errors


def _retrieval_kl_loss(step: Step, gen, device, dtype, atol, rtol):
    B, K = step.dims["B"], step.dims["K"]
    s = _randn((B, K), gen, device, dtype).requires_grad_(True)
    r = _randn((B, K), gen, device, dtype, 3.0)
    rows = ops.retrieval_kl_loss(s, r, TAU_RETRIEVER, TAU_READER, reduction="none")
    grad_rows = _randn((B,), gen, device)
    rows.backward(grad_rows)
    s64 = s.detach().double().requires_grad_(True)
    ref = ops.retrieval_kl_loss_reference(s64, r.double(), TAU_RETRIEVER, TAU_READER, reduction="none")
    ref.backward(grad_rows.double())
    # the gradient (q - p) / tau_retriever is O(1 / tau_retriever): the CPU tests scale atol likewise
    return {
        "loss per row": compare(rows, ref, atol, rtol),
        "d scores": compare(s.grad, s64.grad, atol / min(TAU_RETRIEVER, 1.0), rtol),
    }


def _fuse_candidates(step: Step, gen, device, dtype, atol, rtol):
    B, K, C = step.dims["B"], step.dims["K"], step.dims["C"]
    lp = torch.log_softmax(_randn((B, K, C), gen, device, scale=2.0), dim=-1).to(dtype).requires_grad_(True)
    s = _randn((B, K), gen, device, dtype).requires_grad_(True)
    out = ops.fuse_candidates(lp, s, TAU_FUSE)
    grad_out = _randn((B, C), gen, device)
    out.backward(grad_out)
    lp64 = lp.detach().double().requires_grad_(True)
    s64 = s.detach().double().requires_grad_(True)
    ref = ops.fuse_candidates_reference(lp64, s64, TAU_FUSE)
    ref.backward(grad_out.double())
    return {
        "out": compare(out, ref, atol, rtol),
        "d log-probs": compare(lp.grad, lp64.grad, atol, rtol),
        "d scores": compare(s.grad, s64.grad, atol / min(TAU_FUSE, 1.0), rtol),
    }


def random_unit_rows(n: int, d: int, gen, device, dtype, chunk: int = DRAW_CHUNK) -> torch.Tensor:
    """``[n, d]`` rows drawn normal and L2-normalised in ``dtype``, made ``chunk`` rows at a time (so
    the fp32 draw of a 2M-row index never exists whole)."""
    out = torch.empty((n, d), device=device, dtype=dtype)
    for n0 in range(0, n, chunk):
        rows = torch.randn((min(chunk, n - n0), d), generator=gen, device=device)
        out[n0 : n0 + rows.shape[0]] = torch.nn.functional.normalize(rows, dim=-1).to(dtype)
    return out


def _topk_similarity(step: Step, gen, device, dtype, shapes: Shapes):
    Q, N, D, k = step.dims["Q"], step.dims["N"], step.dims["D"], step.dims["k"]
    atol, rtol = TOPK_SCORE_TOLERANCE
    index = random_unit_rows(N, D, gen, device, dtype)
    queries = random_unit_rows(Q, D, gen, device, torch.float32)
    scores, ids = ops.topk_similarity(queries, index, k)
    # float64 reference on the inputs as the op sees them (queries rounded to the index dtype), scored
    # chunk by chunk: a float64 copy of the whole index would not fit beside it.
    q64 = queries.to(dtype).double()
    full = torch.empty((Q, N), device=device, dtype=torch.float64)
    for n0 in range(0, N, shapes.ref_chunk):
        full[:, n0 : n0 + shapes.ref_chunk] = q64 @ index[n0 : n0 + shapes.ref_chunk].double().T
    kk = min(k + 1, N)
    top = torch.topk(full, kk, dim=1)  # sorted descending
    del full
    ref_scores = top.values[:, :k]
    own = (q64[:, None, :] * index[ids].double()).sum(-1)
    # ids must agree wherever the reference's k-th score is apart from its neighbours (fp32 sums in
    # another order may swap two nearly equal ones: tests/test_topk_similarity.py)
    padded = torch.cat([top.values, top.values[:, -1:] - 1], dim=1) if kk == k else top.values
    gap = 4 * atol
    separated = padded[:, :k] - padded[:, 1 : k + 1] > gap
    separated[:, 1:] &= padded[:, : k - 1] - padded[:, 1:k] > gap
    ids_ok = bool(torch.equal(ids[separated], top.indices[:, :k][separated]))
    distinct = all(len(set(row)) == k for row in ids.tolist())
    return {
        "scores": compare(scores, ref_scores, atol, rtol),
        "scores of the returned ids": compare(scores, own, atol, rtol),
        "ids (where separated)": (float((ids != top.indices[:, :k])[separated].sum()), ids_ok and distinct),
    }, (atol, rtol)


def check(step: Step, shapes: Shapes, device: torch.device | str, seed: int = 0) -> dict:
    """Run one correctness step on ``device``; the result row (errors, tolerances, passed)."""
    device = torch.device(device)
    dtype = getattr(torch, step.dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    if step.op == "topk_similarity":
        errors, (atol, rtol) = _topk_similarity(step, gen, device, dtype, shapes)
        return _result(step, atol, rtol, errors)
    atol, rtol = TOLERANCES[step.dtype]
    runners = {
        "class_log_softmax": _class_log_softmax,
        "head_class_log_softmax": _head_class_log_softmax,
        "retrieval_kl_loss": _retrieval_kl_loss,
        "fuse_candidates": _fuse_candidates,
    }
    if step.op not in runners:
        raise ValueError(f"step.op: expected one of {sorted(runners) + ['topk_similarity']}, got {step.op!r}")
    return _result(step, atol, rtol, runners[step.op](step, gen, device, dtype, atol, rtol))
