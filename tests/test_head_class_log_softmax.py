"""head_class_log_softmax: torch and Triton (interpreter) paths against the float64 reference
``log_softmax(hidden @ weight[ids].T + bias[ids])``, forward and gradients w.r.t. hidden, weight, bias."""

import math

import pytest
import torch
from conftest import TOLERANCES
from hypothesis import given, settings
from hypothesis import strategies as st

from jomed_fast.ops import head_class_log_softmax, head_class_log_softmax_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _float64_reference(hidden, weight, class_ids, bias=None):
    """The spec written out, independently of the op module's reference."""
    logits = hidden.double() @ weight.double()[class_ids].T
    if bias is not None:
        logits = logits + bias.double()[class_ids]
    return torch.log_softmax(logits, -1)


def _make(N, H, V, C, dtype, seed=0, with_bias=True, hidden_dtype=None):
    """Inputs with logits of O(3): hidden ~ N(0, 1), weight rows ~ N(0, 4/H), bias ~ N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen).to(hidden_dtype or dtype)
    weight = (torch.randn(V, H, generator=gen) * (2 / math.sqrt(max(H, 1)))).to(dtype)
    bias = torch.randn(V, generator=gen).to(dtype) if with_bias else None
    class_ids = torch.randperm(V, generator=gen)[:C]
    return hidden, weight, class_ids, bias


def _check(hidden, weight, class_ids, bias=None, grad_seed=0, tol_dtype=None):
    """Forward and all gradients of the op against float64 on the same (already rounded) inputs."""
    atol, rtol = TOLERANCES[tol_dtype or max(hidden.dtype, weight.dtype, key=lambda d: TOLERANCES[d][0])]
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    b = None if bias is None else bias.detach().clone().requires_grad_(True)
    out = head_class_log_softmax(h, w, class_ids, b)
    assert out.dtype == torch.float32
    assert out.shape == (hidden.shape[0], class_ids.numel())

    h64 = hidden.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    b64 = None if bias is None else bias.detach().double().requires_grad_(True)
    ref = _float64_reference(h64, w64, class_ids, b64)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)

    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed))
    (out * g).sum().backward()
    (ref * g.double()).sum().backward()
    assert h.grad.dtype == hidden.dtype and w.grad.dtype == weight.dtype
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=atol, rtol=rtol)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=atol, rtol=rtol)
    off_class = torch.ones(weight.shape[0], dtype=torch.bool)
    off_class[class_ids] = False
    assert torch.count_nonzero(w.grad[off_class]) == 0, "weight grad must be exactly zero outside the class rows"
    if bias is not None:
        assert b.grad.dtype == bias.dtype and b.grad.shape == bias.shape
        torch.testing.assert_close(b.grad.double(), b64.grad, atol=atol, rtol=rtol)
        assert torch.count_nonzero(b.grad[off_class]) == 0
    return out


def test_module_reference_is_the_spec():
    hidden, weight, class_ids, bias = _make(9, 33, 70, 6, torch.float64)
    torch.testing.assert_close(
        head_class_log_softmax_reference(hidden, weight, class_ids, bias),
        _float64_reference(hidden, weight, class_ids, bias),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize(
    "N,H,V,C",
    [
        (37, 300, 500, 5),  # H not a multiple of any block: a masked tail on the H loop
        (1, 100, 50, 1),  # N=1, C=1
        (65, 257, 120, 16),  # two row blocks under the interpreter; H = 256 + 1: a last H step of one
        (3, 7, 260, 257),  # C > 256: the unfused path over several class blocks
    ],
)
def test_matches_float64(backend, dtype, with_bias, N, H, V, C):
    _check(*_make(N, H, V, C, dtype, with_bias=with_bias))


@pytest.mark.parametrize(
    "hidden_dtype,weight_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)]
)
def test_mixed_dtypes(backend, hidden_dtype, weight_dtype):
    """The reader's hidden may be fp32 while its head is 16-bit: both are upcast, gradients keep each dtype."""
    hidden, weight, class_ids, bias = _make(11, 90, 120, 4, weight_dtype, hidden_dtype=hidden_dtype)
    _check(hidden, weight, class_ids, bias)


@pytest.mark.parametrize("fp32_forward_tiles", [True, False])
def test_gpu_tiles_under_the_interpreter(monkeypatch, fp32_forward_tiles):
    """The small GPU tiles (several row, H and class steps) give the same answer as the big interpreter ones."""
    import jomed_fast.kernels.head_class_log_softmax as kernel

    fwd_blocks, bwd_blocks = kernel._fwd_blocks, kernel._bwd_blocks
    monkeypatch.setattr(
        kernel, "_fwd_blocks", lambda C, dot_f32, interpret=None: fwd_blocks(C, fp32_forward_tiles, False)
    )
    monkeypatch.setattr(kernel, "_bwd_blocks", lambda C, interpret=None: bwd_blocks(C, False))
    monkeypatch.setenv("JOMED_FAST_BACKEND", "triton")
    assert kernel._fwd_blocks(5, True).block_h < 256  # the patch took
    _check(*_make(45, 200, 90, 5, torch.float32, seed=1))
    _check(*_make(20, 70, 150, 100, torch.bfloat16, seed=2))  # C=100: several class steps in the backward


def test_single_class_is_log_one(backend):
    hidden, weight, class_ids, bias = _make(4, 24, 30, 1, torch.float32)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = head_class_log_softmax(h, w, class_ids, bias)
    assert torch.equal(out, torch.zeros(4, 1))
    out.sum().backward()  # log 1 does not depend on anything
    assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_magnitude_is_stable(backend, dtype):
    """Logits of magnitude ~1e4. Small integers make the inputs and every fp32 partial sum exact
    (|logit| < 2**24), so a mismatch can only come from the log-softmax, not from the dot's rounding.
    The two top classes sit 1 apart at ~2.5e4: a softmax without the max shift overflows."""
    gen = torch.Generator().manual_seed(3)
    N, H, V = 6, 128, 200
    class_ids = torch.tensor([17, 0, 199, 123, 55])
    hidden = torch.randint(0, 101, (N, H), generator=gen).to(dtype)
    weight = torch.randint(-2, 5, (V, H), generator=gen)
    bias = torch.randint(-100, 101, (V,), generator=gen)
    weight[17] = 4
    weight[0] = 4
    bias[0] = bias[17] - 1
    weight, bias = weight.to(dtype), bias.to(dtype)
    out = _check(hidden, weight, class_ids, bias)
    ref = _float64_reference(hidden, weight, class_ids, bias)
    assert torch.isfinite(out).all()
    assert (hidden.double() @ weight.double()[class_ids].T).abs().max() > 1e4
    expected_top = torch.tensor([-math.log1p(math.exp(-1)), -1 - math.log1p(math.exp(-1))])
    torch.testing.assert_close(out[:, :2], expected_top.expand(N, 2), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.exp().sum(-1).double(), torch.ones(N, dtype=torch.float64))
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_minus_inf_logits(backend):
    hidden, weight, _, bias = _make(3, 20, 40, 0, torch.float32)
    class_ids = torch.tensor([3, 10, 25])
    bias[10] = -math.inf  # one class impossible: probability 0, the others renormalised
    bias[11] = -math.inf  # -inf outside the classes changes nothing
    out = _check(hidden, weight, class_ids, bias)
    assert (out[:, 1] == -math.inf).all() and torch.isfinite(out[:, [0, 2]]).all()
    # All class logits -inf: no distribution, NaN, as torch.log_softmax gives (never a crash).
    bias[class_ids] = -math.inf
    out = head_class_log_softmax(hidden, weight, class_ids, bias)
    assert torch.isnan(out).all()


def test_nan_propagates(backend):
    hidden, weight, _, bias = _make(3, 20, 40, 0, torch.float32)
    class_ids = torch.tensor([3, 10, 25])
    hidden[0, 5] = math.nan
    weight[11, 2] = math.nan  # a NaN off the class rows is never read
    out = head_class_log_softmax(hidden, weight, class_ids, bias)
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1:]).all()
    weight[25, 7] = math.nan  # a NaN in a class row reaches every row
    out = head_class_log_softmax(hidden, weight, class_ids, bias)
    assert torch.isnan(out).all()


def test_non_contiguous_inputs(backend):
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(30, 64, generator=gen)[::3, ::2]  # [10, 32], strides (192, 2)
    weight = torch.randn(32, 80, generator=gen).T  # [80, 32], strides (1, 80): a transposed view
    bias = torch.randn(160, generator=gen)[::2]
    class_ids = torch.tensor([5, 31, 0, 9, 7, 70])[::2]  # strided ids [5, 0, 7]
    assert not (hidden.is_contiguous() or weight.is_contiguous() or class_ids.is_contiguous())
    _check(hidden, weight, class_ids, bias)


def test_only_requested_gradients(backend):
    hidden, weight, class_ids, bias = _make(5, 12, 30, 4, torch.bfloat16)
    h = hidden.clone().requires_grad_(True)
    out = head_class_log_softmax(h, weight, class_ids, bias)  # the frozen head of stage 1
    out[:, 0].sum().backward()
    assert h.grad is not None and weight.grad is None and bias.grad is None
    w = weight.clone().requires_grad_(True)
    head_class_log_softmax(hidden, w, class_ids)[:, 1].sum().backward()
    assert w.grad is not None and w.grad.shape == weight.shape


def test_empty_rows(backend):
    hidden, weight, class_ids, bias = _make(0, 12, 30, 4, torch.float32)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = head_class_log_softmax(h, w, class_ids, bias)
    assert out.shape == (0, 4)
    out.sum().backward()
    assert h.grad.shape == (0, 12) and torch.count_nonzero(w.grad) == 0


@settings(max_examples=12, deadline=None)
@given(
    N=st.integers(1, 40),
    H=st.integers(1, 300),
    V=st.integers(1, 300),
    data=st.data(),
    dtype=st.sampled_from(DTYPES),
    with_bias=st.booleans(),
    use_triton=st.booleans(),
)
def test_property_random_shapes(use_backend, N, H, V, data, dtype, with_bias, use_triton):
    C = data.draw(st.integers(1, min(V, 40)))
    seed = data.draw(st.integers(0, 2**31 - 1))
    with use_backend("triton" if use_triton else "torch"):
        _check(*_make(N, H, V, C, dtype, seed=seed, with_bias=with_bias), grad_seed=seed)


def test_compiles_fullgraph_forward_and_backward(backend):
    class_ids = torch.tensor([2, 9, 4])

    def loss_fn(hidden, weight, bias, target):
        return torch.nn.functional.nll_loss(head_class_log_softmax(hidden, weight, class_ids, bias), target)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    hidden, weight, _, bias = _make(5, 24, 16, 3, torch.float32)
    target = torch.tensor([0, 1, 2, 0, 1])
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    eager_leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss = compiled(*leaves, target)
    loss.backward()
    eager = loss_fn(*eager_leaves, target)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    for leaf, eager_leaf in zip(leaves, eager_leaves):
        torch.testing.assert_close(leaf.grad, eager_leaf.grad)


_H = torch.randn(3, 8)
_W = torch.randn(10, 8)
_IDS = torch.tensor([1, 4])


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"hidden": torch.randn(8)}, ValueError, r"hidden: expected 2-D \[N, H\], got shape \(8,\)"),
        ({"hidden": torch.randn(2, 3, 8)}, ValueError, r"hidden: expected 2-D \[N, H\]"),
        ({"weight": torch.randn(80)}, ValueError, r"weight: expected 2-D \[V, H\]"),
        ({"weight": torch.randn(10, 9)}, ValueError, r"weight: expected shape \[V, H\] with H=8 .*got \(10, 9\)"),
        ({"bias": torch.randn(11)}, ValueError, r"bias: expected shape \[V\] with V=10 .*got \(11,\)"),
        ({"bias": torch.randn(10, 1)}, ValueError, r"bias: expected shape \[V\] with V=10"),
        ({"class_ids": torch.tensor([1, 1])}, ValueError, "class_ids: expected distinct"),
        ({"class_ids": torch.tensor([1, 10])}, ValueError, r"class_ids: expected ids in \[0, 10\)"),
        ({"class_ids": torch.tensor([-1, 2])}, ValueError, r"class_ids: expected ids in \[0, 10\)"),
        ({"class_ids": torch.tensor([], dtype=torch.int64)}, ValueError, "class_ids: expected a non-empty 1-D"),
        ({"class_ids": torch.tensor([[1, 2]])}, ValueError, "class_ids: expected a non-empty 1-D"),
        ({"class_ids": torch.tensor([1, 2], dtype=torch.int32)}, TypeError, "class_ids: expected dtype int64"),
        ({"class_ids": [1, 2]}, TypeError, "class_ids: expected a torch.Tensor, got list"),
        ({"hidden": torch.randint(0, 5, (3, 8))}, TypeError, "hidden: expected a floating tensor"),
        ({"hidden": torch.randn(3, 8).double()}, TypeError, "hidden: expected a floating tensor"),
        ({"weight": torch.randint(0, 5, (10, 8))}, TypeError, "weight: expected a floating tensor"),
        ({"bias": torch.ones(10, dtype=torch.bool)}, TypeError, "bias: expected a floating tensor"),
        ({"hidden": [[0.0] * 8]}, TypeError, "hidden: expected a torch.Tensor, got list"),
        (
            {"weight": torch.randn(10, 8, device="meta")},
            ValueError,
            r"weight: expected a tensor on cpu \(the device of hidden\), got meta",
        ),
        ({"class_ids": torch.tensor([1, 2], device="meta")}, ValueError, "class_ids: expected a tensor on cpu"),
        ({"bias": torch.randn(10, device="meta")}, ValueError, "bias: expected a tensor on cpu"),
    ],
)
def test_bad_inputs(backend, kwargs, error, match):
    args = {"hidden": _H, "weight": _W, "class_ids": _IDS, "bias": None, **kwargs}
    with pytest.raises(error, match=match):
        head_class_log_softmax(**args)


def test_class_ids_values_are_checked_once_per_tensor(backend, monkeypatch):
    """The value checks sync a GPU with the host, so a task's ids are checked on first use only;
    an in-place change to them is caught (the tensor's version moves)."""
    from jomed_fast.ops import _checks

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(3, 8, generator=g), torch.randn(20, 8, generator=g)
    ids = torch.tensor([4, 9, 2])
    head_class_log_softmax(hidden, weight, ids)

    def no_more_reads(*args, **kwargs):
        raise AssertionError("class ids were read back again")

    with monkeypatch.context() as m:
        m.setattr(_checks.torch, "unique", no_more_reads)
        out = head_class_log_softmax(hidden, weight, ids)
    torch.testing.assert_close(out, head_class_log_softmax_reference(hidden, weight, ids))
    ids[1] = 2  # now a duplicate
    with pytest.raises(ValueError, match="expected distinct ids"):
        head_class_log_softmax(hidden, weight, ids)
    with pytest.raises(ValueError, match=r"expected ids in \[0, 3\)"):
        head_class_log_softmax(hidden, weight[:3], torch.tensor([2, 3]))


def test_a_frozen_weight_gets_no_vocabulary_sized_gradient(backend, monkeypatch):
    """Under LoRA the head is frozen: the backward computes d hidden only, never a [V, H] buffer."""
    import importlib

    op = importlib.import_module("jomed_fast.ops.head_class_log_softmax")

    def vocabulary_gradient(*args, **kwargs):
        raise AssertionError("a [V, H] weight gradient was computed for a frozen weight")

    monkeypatch.setattr(op, "_backward_weight", vocabulary_gradient)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, 8, generator=g, requires_grad=True)
    weight = torch.randn(50, 8, generator=g)
    ids = torch.tensor([3, 7, 11])
    head_class_log_softmax(hidden, weight, ids).logsumexp(-1).sum().backward()
    h64 = hidden.detach().double().requires_grad_(True)
    head_class_log_softmax_reference(h64, weight.double(), ids).logsumexp(-1).sum().backward()
    torch.testing.assert_close(hidden.grad.double(), h64.grad, atol=1e-5, rtol=1e-5)
