"""retrieval_kl_loss: torch and Triton (interpreter) paths against the float64 reference."""

import math

import pytest
import torch
from conftest import TOLERANCES
from hypothesis import given, settings
from hypothesis import strategies as st

from jomed_fast.ops import retrieval_kl_loss, retrieval_kl_loss_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REDUCTIONS = ["batchmean", "sum", "none"]


def _check(scores, reader, tau_retriever=1.0, tau_reader=1.0, reduction="batchmean", grad_seed=0):
    """Forward and backward of the op against float64 on the same (already rounded) inputs."""
    atol, rtol = TOLERANCES[scores.dtype]
    s = scores.detach().clone().requires_grad_(True)
    out = retrieval_kl_loss(s, reader, tau_retriever, tau_reader, reduction)
    assert out.dtype == torch.float32
    assert out.shape == ((scores.shape[0],) if reduction == "none" else ())
    s64 = scores.detach().double().requires_grad_(True)
    ref = retrieval_kl_loss_reference(s64, reader.double(), tau_retriever, tau_reader, reduction)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)

    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed))
    (out * g).sum().backward()
    (ref * g.double()).sum().backward()
    assert s.grad.dtype == scores.dtype
    # The gradient (q - p) / tau_retriever is O(1 / tau_retriever): scale the absolute tolerance.
    torch.testing.assert_close(s.grad.double(), s64.grad, atol=atol / min(tau_retriever, 1.0), rtol=rtol)
    return out


def _inputs(B, K, dtype=torch.float32, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    scores = (torch.randn(B, K, generator=gen) * scale).to(dtype)
    reader = (torch.randn(B, K, generator=gen) * scale).to(dtype)
    return scores, reader


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,K", [(7, 50), (1, 1), (3, 1), (1, 37), (300, 13), (5, 300)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_float64(backend, dtype, B, K, reduction):
    scores, reader = _inputs(B, K, dtype)
    _check(scores, reader, reduction=reduction)


@pytest.mark.parametrize(
    "tau_retriever,tau_reader", [(0.01, 1.0), (100.0, 1.0), (1.0, 0.01), (1.0, 100.0), (0.05, 0.1)]
)
def test_temperatures_far_from_one(backend, tau_retriever, tau_reader):
    scores, reader = _inputs(6, 50)
    _check(scores, reader, tau_retriever, tau_reader, reduction="none")


def test_gpu_block_sizes_under_the_interpreter(monkeypatch):
    """The shipped GPU tiles (1024 values, several programs, one row per program at K = 4096) run
    correctly: the launcher is made to pick them under the interpreter."""
    from jomed_fast.kernels import retrieval_kl_loss as kernel

    blocks = kernel._blocks
    monkeypatch.setattr(kernel, "_blocks", lambda K: blocks(K, interpret=False))
    monkeypatch.setenv("JOMED_FAST_BACKEND", "triton")
    for B, K in [(70, 50), (3, 2000)]:
        scores, reader = _inputs(B, K, seed=B)
        _check(scores, reader, 0.5, 2.0, reduction="none")


def test_reader_and_scores_of_different_dtypes(backend):
    # The real pipeline: bf16 retriever scores, float32 reader log-likelihoods.
    scores, reader = _inputs(9, 50)
    _check(scores.bfloat16(), reader, 0.3, 1.0)


def test_non_contiguous_inputs(backend):
    wide, _ = _inputs(20, 100)
    _, tall = _inputs(50, 20, seed=1)
    _check(wide[:, ::2], tall.t(), reduction="none")  # strides (100, 2) and (1, 20)


def test_agrees_with_torch_kl_div():
    """The reference itself against torch's kl_div (finite inputs), so the spec cannot drift."""
    scores, reader = _inputs(8, 50, torch.float64)
    log_q = torch.log_softmax(scores / 0.7, dim=-1)
    p = torch.softmax(reader / 1.3, dim=-1)
    expected = torch.nn.functional.kl_div(log_q, p, reduction="batchmean")
    torch.testing.assert_close(retrieval_kl_loss_reference(scores, reader, 0.7, 1.3), expected)


def test_identical_distributions_give_zero(backend):
    scores, _ = _inputs(4, 50)
    s = scores.clone().requires_grad_(True)
    loss = retrieval_kl_loss(s, scores * 2.0, tau_retriever=0.5, tau_reader=1.0, reduction="sum")
    loss.backward()
    assert abs(loss.item()) < 1e-5
    assert s.grad.abs().max() < 1e-5


def test_single_candidate_is_zero(backend):
    s = torch.randn(5, 1, requires_grad=True)
    loss = retrieval_kl_loss(s, torch.randn(5, 1), reduction="none")
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros(5))
    assert torch.equal(s.grad, torch.zeros(5, 1))


def test_reader_gets_no_gradient(backend):
    scores, reader = _inputs(3, 10)
    s, r = scores.requires_grad_(True), reader.requires_grad_(True)
    retrieval_kl_loss(s, r).backward()
    assert s.grad is not None and r.grad is None


def test_minus_inf_reader_entries(backend):
    scores, reader = _inputs(4, 50)
    reader[0, 3] = -math.inf  # the reader rules candidate 3 out: p = 0, adds nothing
    reader[1, :40] = -math.inf  # only 10 candidates left
    reader[2, 1:] = -math.inf  # a one-hot target: loss = -log q_0
    out = _check(scores, reader, reduction="none")
    assert torch.isfinite(out).all()
    expected = -torch.log_softmax(scores[2].double(), dim=-1)[0]
    torch.testing.assert_close(out[2].double(), expected, atol=2e-5, rtol=2e-5)


def test_all_minus_inf_reader_row_is_nan(backend):
    """A row whose reader log-likelihoods are all -inf has no target distribution: its loss and its
    score gradients are NaN, and so is any reduction over it. Other rows are untouched."""
    scores, reader = _inputs(3, 20)
    reader[1] = -math.inf
    s = scores.clone().requires_grad_(True)
    out = retrieval_kl_loss(s, reader, reduction="none")
    out.sum().backward()
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()
    assert torch.isnan(s.grad[1]).all() and torch.isfinite(s.grad[[0, 2]]).all()
    assert torch.isnan(retrieval_kl_loss(scores, reader))


def test_minus_inf_score_where_reader_has_mass(backend):
    # q = 0 where p > 0: the KL is +inf; the gradient (q - p) / tau stays finite.
    scores, reader = _inputs(2, 8)
    scores[0, 5] = -math.inf
    s = scores.clone().requires_grad_(True)
    out = retrieval_kl_loss(s, reader, reduction="none")
    out.sum().backward()
    assert out[0] == math.inf and torch.isfinite(out[1])
    assert torch.isfinite(s.grad).all()
    assert s.grad[0, 5] < 0


@pytest.mark.parametrize("where", ["scores", "reader"])
def test_nan_propagates(backend, where):
    scores, reader = _inputs(3, 16)
    (scores if where == "scores" else reader)[1, 4] = math.nan
    out = retrieval_kl_loss(scores, reader, reduction="none")
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_magnitude_is_stable(backend, dtype):
    scores, reader = _inputs(6, 50, dtype, scale=1e4)
    out = _check(scores, reader, reduction="none")
    assert torch.isfinite(out).all()
    # Magnitude 1e4 and a small temperature together: (s - max) / tau, never s / tau ~ 1e6.
    _check(*_inputs(6, 50, scale=1e4, seed=1), tau_retriever=0.01, tau_reader=0.01, reduction="none")


@pytest.mark.parametrize("tau", [0.01, 0.05])
def test_large_offset_small_temperature_keeps_precision(backend, tau):
    """Scores near 1e4 that differ by O(1), at a small temperature: s / tau ~ 1e6 has an fp32 ulp of
    0.06, so only shifting by the row max before dividing meets the fp32 tolerance."""
    scores, reader = _inputs(6, 50, scale=1.0, seed=2)
    _check(scores + 1e4, reader - 1e4, tau_retriever=tau, tau_reader=tau, reduction="none")


def test_empty_batch(backend):
    s = torch.randn(0, 5, requires_grad=True)
    assert retrieval_kl_loss(s, torch.randn(0, 5), reduction="none").shape == (0,)
    assert retrieval_kl_loss(s, torch.randn(0, 5), reduction="sum") == 0
    assert torch.isnan(retrieval_kl_loss(s, torch.randn(0, 5)))  # mean of nothing


@settings(max_examples=12, deadline=None)
@given(
    B=st.integers(1, 40),
    K=st.integers(1, 140),
    dtype=st.sampled_from(DTYPES),
    tau_retriever=st.sampled_from([0.1, 1.0, 3.0]),
    tau_reader=st.sampled_from([0.1, 1.0, 3.0]),
    reduction=st.sampled_from(REDUCTIONS),
    seed=st.integers(0, 2**31 - 1),
    use_triton=st.booleans(),
)
def test_property_random_shapes(use_backend, B, K, dtype, tau_retriever, tau_reader, reduction, seed, use_triton):
    scores, reader = _inputs(B, K, dtype, seed=seed)
    with use_backend("triton" if use_triton else "torch"):
        out = _check(scores, reader, tau_retriever, tau_reader, reduction, grad_seed=seed)
    assert (out >= -1e-5).all()  # a KL divergence is never negative


def test_compiles_fullgraph_forward_and_backward(backend):
    def loss_fn(scores, reader):
        return retrieval_kl_loss(scores * 2.0, reader, tau_retriever=0.5, tau_reader=2.0)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    scores, reader = _inputs(5, 50)
    s = scores.clone().requires_grad_(True)
    loss = compiled(s, reader)
    loss.backward()
    eager_s = scores.clone().requires_grad_(True)
    eager = loss_fn(eager_s, reader)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(s.grad, eager_s.grad)


_S = torch.randn(3, 5)


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((_S, torch.randn(3, 4)), {}, ValueError, r"reader_log_likelihoods: expected shape \[B, K\] = \(3, 5\)"),
        ((_S, torch.randn(2, 5)), {}, ValueError, r"reader_log_likelihoods: expected shape \[B, K\] = \(3, 5\)"),
        ((_S, torch.randn(3, 5, 1)), {}, ValueError, r"reader_log_likelihoods: expected 2-D \[B, K\]"),
        ((torch.randn(15), torch.randn(3, 5)), {}, ValueError, r"retriever_scores: expected 2-D \[B, K\]"),
        (
            (torch.randn(3, 0), torch.randn(3, 0)),
            {},
            ValueError,
            r"retriever_scores: expected shape \[B, K\] with K >= 1",
        ),
        (
            (_S, torch.randn(3, 5)),
            {"tau_retriever": 0.0},
            ValueError,
            "tau_retriever: expected a finite number > 0, got 0.0",
        ),
        (
            (_S, torch.randn(3, 5)),
            {"tau_reader": -1.0},
            ValueError,
            "tau_reader: expected a finite number > 0, got -1.0",
        ),
        ((_S, torch.randn(3, 5)), {"tau_reader": math.inf}, ValueError, "tau_reader: expected a finite number > 0"),
        (
            (_S, torch.randn(3, 5)),
            {"tau_retriever": math.nan},
            ValueError,
            "tau_retriever: expected a finite number > 0",
        ),
        (
            (_S, torch.randn(3, 5)),
            {"tau_retriever": "1"},
            TypeError,
            "tau_retriever: expected a positive number, got str",
        ),
        (
            (_S, torch.randn(3, 5)),
            {"reduction": "mean"},
            ValueError,
            r"reduction: expected one of \('batchmean', 'sum', 'none'\), got 'mean'",
        ),
        (
            (torch.randint(0, 5, (3, 5)), torch.randn(3, 5)),
            {},
            TypeError,
            "retriever_scores: expected a floating tensor",
        ),
        ((_S, torch.randint(0, 5, (3, 5))), {}, TypeError, "reader_log_likelihoods: expected a floating tensor"),
        ((_S, torch.randn(3, 5).double()), {}, TypeError, "reader_log_likelihoods: expected a floating tensor"),
        ((_S.tolist(), torch.randn(3, 5)), {}, TypeError, "retriever_scores: expected a torch.Tensor, got list"),
        ((_S, torch.randn(3, 5, device="meta")), {}, ValueError, "reader_log_likelihoods: expected a tensor on cpu"),
    ],
)
def test_bad_inputs(backend, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        retrieval_kl_loss(*args, **kwargs)
