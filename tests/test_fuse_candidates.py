"""fuse_candidates: torch and Triton (interpreter) paths against the float64 reference."""

import math

import pytest
import torch
from conftest import TOLERANCES
from hypothesis import given, settings
from hypothesis import strategies as st

from jomed_fast.ops import fuse_candidates, fuse_candidates_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _check(log_probs, scores, tau=1.0, grad_seed=0, upstream="random"):
    """Forward and backward (w.r.t. both inputs) against float64 on the same (already rounded) inputs."""
    atol, rtol = TOLERANCES[log_probs.dtype]
    lp = log_probs.detach().clone().requires_grad_(True)
    s = scores.detach().clone().requires_grad_(True)
    out = fuse_candidates(lp, s, tau)
    assert out.dtype == torch.float32
    assert out.shape == (log_probs.shape[0], log_probs.shape[2])
    lp64 = log_probs.detach().double().requires_grad_(True)
    s64 = scores.detach().double().requires_grad_(True)
    ref = fuse_candidates_reference(lp64, s64, tau)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)

    if upstream == "random":
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed))
        (out * g).sum().backward()
        (ref * g.double()).sum().backward()
    else:  # .sum(): the upstream gradient is an expanded tensor of stride 0
        out.sum().backward()
        ref.sum().backward()
    assert lp.grad.dtype == log_probs.dtype and s.grad.dtype == scores.dtype
    torch.testing.assert_close(lp.grad.double(), lp64.grad, atol=atol, rtol=rtol)
    # d s = (a - w sum a) / tau is O(1 / tau): scale the absolute tolerance.
    s_atol = max(atol, TOLERANCES[scores.dtype][0]) / min(tau, 1.0)
    torch.testing.assert_close(s.grad.double(), s64.grad, atol=s_atol, rtol=max(rtol, TOLERANCES[scores.dtype][1]))
    return out


def _inputs(B, K, C, dtype=torch.float32, seed=0, scale=3.0, score_dtype=None):
    """Per-candidate class log-probabilities (each exp(l[b, k]) sums to 1 over C) and scores."""
    gen = torch.Generator().manual_seed(seed)
    log_probs = torch.log_softmax(torch.randn(B, K, C, generator=gen) * 2, dim=-1).to(dtype)
    scores = (torch.randn(B, K, generator=gen) * scale).to(score_dtype or dtype)
    return log_probs, scores


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,K,C", [(3, 50, 2), (1, 1, 1), (4, 1, 5), (2, 7, 300), (5, 37, 1), (3, 300, 257)])
def test_matches_float64(backend, dtype, B, K, C):
    log_probs, scores = _inputs(B, K, C, dtype)
    _check(log_probs, scores, tau=0.7)


@pytest.mark.parametrize("tau", [0.01, 100.0])
def test_temperatures_far_from_one(backend, tau):
    _check(*_inputs(6, 50, 4), tau=tau)


def test_gpu_block_sizes_under_the_interpreter(monkeypatch):
    """The shipped GPU tiles (1024 values: several queries per program at K = 50, C = 2; the class
    loop at C = 100; one query on a K = 2048 row) run correctly when the launcher picks them."""
    from jomed_fast.kernels import fuse_candidates as kernel

    blocks = kernel._blocks
    monkeypatch.setattr(kernel, "_blocks", lambda K, C: blocks(K, C, interpret=False))
    monkeypatch.setenv("JOMED_FAST_BACKEND", "triton")
    for B, K, C in [(21, 50, 2), (3, 50, 100), (2, 2000, 3)]:
        _check(*_inputs(B, K, C, seed=B), tau=0.5)


def test_upstream_gradient_of_stride_zero(backend):
    _check(*_inputs(4, 50, 3), upstream="sum")


def test_mixed_dtypes(backend):
    # bf16 reader log-probs with float32 scores (what topk_similarity returns), and the reverse.
    _check(*_inputs(3, 50, 4, torch.bfloat16, score_dtype=torch.float32))
    _check(*_inputs(3, 50, 4, torch.float32, score_dtype=torch.bfloat16))


def test_non_contiguous_inputs(backend):
    log_probs, scores = _inputs(6, 20, 8)
    _check(log_probs.transpose(0, 2).contiguous().transpose(0, 2), scores[:, ::2].repeat_interleave(2, dim=1))
    _check(log_probs[:, ::2, 1:], scores.t().contiguous().t()[:, ::2])


def test_fused_posterior_is_a_distribution(backend):
    out = fuse_candidates(*_inputs(8, 50, 6), tau=0.3)
    torch.testing.assert_close(out.sum(dim=-1), torch.ones(8))
    assert (out >= 0).all()


def test_single_candidate_returns_its_probabilities(backend):
    log_probs, scores = _inputs(5, 1, 4)
    out = fuse_candidates(log_probs, scores, tau=0.01)
    torch.testing.assert_close(out, log_probs[:, 0].exp())


def test_agrees_with_the_plain_formula():
    """The reference (exp(l + log w)) against the formula as the paper writes it, exp(l) * softmax."""
    log_probs, scores = _inputs(4, 50, 3, torch.float64)
    expected = torch.einsum("bkc,bk->bc", log_probs.exp(), torch.softmax(scores / 0.4, dim=-1))
    torch.testing.assert_close(fuse_candidates_reference(log_probs, scores, 0.4), expected)


def test_minus_inf_entries(backend):
    log_probs, scores = _inputs(3, 10, 4)
    log_probs[0, 2, 1] = -math.inf  # class 1 impossible under candidate 2
    log_probs[1, :, 3] = -math.inf  # class 3 impossible under every candidate: fused probability 0
    scores[2, 4] = -math.inf  # candidate 4 has weight 0
    out = _check(log_probs, scores)
    assert torch.isfinite(out).all() and out[1, 3] == 0
    # A zero-weight candidate does not change the fusion, whatever it predicts.
    changed = log_probs.clone()
    changed[2, 4] = torch.log_softmax(torch.randn(4), dim=-1)
    torch.testing.assert_close(fuse_candidates(changed, scores), out)


def test_all_minus_inf_scores_row_is_nan(backend):
    """A query whose candidates all score -inf has no weights: its fused row (and its gradients) is
    NaN. Other queries are untouched."""
    log_probs, scores = _inputs(3, 12, 4)
    scores[1] = -math.inf
    lp, s = log_probs.clone().requires_grad_(True), scores.clone().requires_grad_(True)
    out = fuse_candidates(lp, s)
    out.sum().backward()
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()
    assert torch.isnan(s.grad[1]).all() and torch.isfinite(s.grad[[0, 2]]).all()
    assert torch.isfinite(lp.grad[[0, 2]]).all()


def test_nan_propagates(backend):
    log_probs, scores = _inputs(3, 12, 4)
    scores[0, 3] = math.nan  # a NaN score poisons its query's weights: the whole row
    log_probs[2, 5, 1] = math.nan  # a NaN log-probability poisons its class entry
    out = fuse_candidates(log_probs, scores)
    assert torch.isnan(out[0]).all()
    assert torch.isfinite(out[1]).all()
    assert torch.isnan(out[2, 1]) and torch.isfinite(out[2, [0, 2, 3]]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_magnitude_is_stable(backend, dtype):
    log_probs, scores = _inputs(4, 50, 3, dtype, scale=1e4)
    out = _check(log_probs, scores)
    assert torch.isfinite(out).all()
    # Scores near 1e4 that differ by O(1) at tau = 0.05: s / tau ~ 2e5 would lose fp32 digits.
    log_probs, scores = _inputs(4, 50, 3, scale=1.0, seed=3)
    _check(log_probs, scores + 1e4, tau=0.05)


def test_large_log_probs_times_tiny_weights_do_not_overflow(backend):
    # exp(100) overflows fp32, exp(100 + log w) with w ~ e^-200 does not.
    log_probs = torch.full((1, 2, 2), -1.0)
    log_probs[0, 1] = 100.0
    scores = torch.tensor([[0.0, -200.0]])
    out = fuse_candidates(log_probs, scores)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), fuse_candidates_reference(log_probs.double(), scores.double()))


def test_empty_batch(backend):
    lp = torch.randn(0, 4, 3, requires_grad=True)
    out = fuse_candidates(lp, torch.randn(0, 4))
    assert out.shape == (0, 3)
    out.sum().backward()
    assert lp.grad.shape == (0, 4, 3)


@settings(max_examples=12, deadline=None)
@given(
    B=st.integers(1, 12),
    K=st.integers(1, 70),
    C=st.integers(1, 40),
    dtype=st.sampled_from(DTYPES),
    tau=st.sampled_from([0.1, 1.0, 3.0]),
    seed=st.integers(0, 2**31 - 1),
    use_triton=st.booleans(),
)
def test_property_random_shapes(use_backend, B, K, C, dtype, tau, seed, use_triton):
    log_probs, scores = _inputs(B, K, C, dtype, seed=seed)
    with use_backend("triton" if use_triton else "torch"):
        out = _check(log_probs, scores, tau, grad_seed=seed)
    # Rounded inputs still give an (approximate) distribution over the C classes.
    torch.testing.assert_close(out.sum(dim=-1), torch.ones(B), atol=5e-2, rtol=0)


def test_compiles_fullgraph_forward_and_backward(backend):
    def loss_fn(log_probs, scores, target):
        fused = fuse_candidates(log_probs, scores * 2.0, tau=0.5)
        return torch.nn.functional.nll_loss(fused.log(), target)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    log_probs, scores = _inputs(5, 50, 3)
    target = torch.tensor([0, 1, 2, 0, 1])
    lp, s = log_probs.clone().requires_grad_(True), scores.clone().requires_grad_(True)
    loss = compiled(lp, s, target)
    loss.backward()
    eager_lp, eager_s = log_probs.clone().requires_grad_(True), scores.clone().requires_grad_(True)
    eager = loss_fn(eager_lp, eager_s, target)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(lp.grad, eager_lp.grad)
    torch.testing.assert_close(s.grad, eager_s.grad)


_L = torch.randn(3, 5, 2)
_S = torch.randn(3, 5)


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((_L, torch.randn(3, 4)), ValueError, r"retriever_scores: expected shape \[B, K\] = \(3, 5\)"),
        ((_L, torch.randn(2, 5)), ValueError, r"retriever_scores: expected shape \[B, K\] = \(3, 5\)"),
        ((_L, torch.randn(3, 5, 1)), ValueError, r"retriever_scores: expected 2-D \[B, K\]"),
        ((torch.randn(3, 5), _S), ValueError, r"candidate_log_probs: expected 3-D \[B, K, C\]"),
        (
            (torch.randn(3, 0, 2), torch.randn(3, 0)),
            ValueError,
            r"candidate_log_probs: expected shape \[B, K, C\] with K >= 1 and C >= 1",
        ),
        (
            (torch.randn(3, 5, 0), _S),
            ValueError,
            r"candidate_log_probs: expected shape \[B, K, C\] with K >= 1 and C >= 1",
        ),
        ((_L, _S, 0.0), ValueError, "tau: expected a finite number > 0, got 0.0"),
        ((_L, _S, -2.0), ValueError, "tau: expected a finite number > 0, got -2.0"),
        ((_L, _S, math.inf), ValueError, "tau: expected a finite number > 0"),
        ((_L, _S, None), TypeError, "tau: expected a positive number, got NoneType"),
        ((torch.randint(0, 5, (3, 5, 2)), _S), TypeError, "candidate_log_probs: expected a floating tensor"),
        ((_L, torch.randint(0, 5, (3, 5))), TypeError, "retriever_scores: expected a floating tensor"),
        ((_L.double(), _S), TypeError, "candidate_log_probs: expected a floating tensor"),
        ((_L, _S.tolist()), TypeError, "retriever_scores: expected a torch.Tensor, got list"),
        ((_L, torch.randn(3, 5, device="meta")), ValueError, "retriever_scores: expected a tensor on cpu"),
    ],
)
def test_bad_inputs(backend, args, error, match):
    with pytest.raises(error, match=match):
        fuse_candidates(*args)
