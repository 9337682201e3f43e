"""class_log_softmax: torch and Triton (interpreter) paths against the float64 reference."""

import math

import pytest
import torch
from conftest import TOLERANCES
from hypothesis import given, settings
from hypothesis import strategies as st

from jomed_fast.ops import class_log_softmax, class_log_softmax_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _check(logits, class_ids, grad_seed=0):
    """Forward and backward of the op against float64 on the same (already rounded) inputs."""
    atol, rtol = TOLERANCES[logits.dtype]
    x = logits.detach().clone().requires_grad_(True)
    out = class_log_softmax(x, class_ids)
    assert out.dtype == torch.float32
    assert out.shape == (*logits.shape[:-1], class_ids.numel())
    x64 = logits.detach().double().requires_grad_(True)
    ref = class_log_softmax_reference(x64, class_ids)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)

    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed))
    (out * g).sum().backward()
    (ref * g.double()).sum().backward()
    assert x.grad.dtype == logits.dtype
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=atol, rtol=rtol)
    off_class = torch.ones(logits.shape[-1], dtype=torch.bool)
    off_class[class_ids] = False
    assert torch.count_nonzero(x.grad[..., off_class]) == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,C", [((7, 301), 5), ((3, 5, 1000), 13), ((1, 50), 1), ((129, 97), 97)])
def test_matches_float64(backend, dtype, shape, C):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(shape, generator=gen) * 4).to(dtype)
    class_ids = torch.randperm(shape[-1], generator=gen)[:C]
    _check(logits, class_ids)


def test_single_class_is_log_one(backend):
    logits = torch.randn(4, 20)
    out = class_log_softmax(logits, torch.tensor([7]))
    assert torch.equal(out, torch.zeros(4, 1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_magnitude_is_stable(backend, dtype):
    logits = (torch.randn(6, 400) * 1e4).to(dtype)
    class_ids = torch.tensor([0, 17, 399, 123])
    out = class_log_softmax(logits, class_ids)
    assert torch.isfinite(out).all()
    _check(logits, class_ids)


def test_minus_inf_logits(backend):
    logits = torch.randn(3, 40)
    class_ids = torch.tensor([1, 2, 3])
    logits[0, 2] = -math.inf  # one class impossible: probability 0, others renormalised
    logits[1, 10] = -math.inf  # -inf outside the classes changes nothing
    out = class_log_softmax(logits, class_ids)
    ref = class_log_softmax_reference(logits.double(), class_ids)
    assert out[0, 1] == -math.inf
    torch.testing.assert_close(out.double(), ref)
    # A row whose class logits are all -inf has no distribution: NaN, as torch.log_softmax gives.
    logits[2, class_ids] = -math.inf
    out = class_log_softmax(logits, class_ids)
    assert torch.isnan(out[2]).all() and torch.isfinite(out[1]).all()


def test_nan_propagates(backend):
    logits = torch.randn(2, 30)
    logits[0, 5] = math.nan
    out = class_log_softmax(logits, torch.tensor([5, 6, 7]))
    assert torch.isnan(out[0]).all()
    assert torch.isfinite(out[1]).all()


def test_non_contiguous_logits_and_class_ids(backend):
    base = torch.randn(30, 64)
    logits = base[::3, ::2]  # strides (192, 2)
    _check(logits, torch.tensor([31, 0, 9]))
    _check(logits, torch.tensor([5, 31, 0, 9, 7, 30])[::2])  # ids [5, 0, 7] at stride 2


@settings(max_examples=12, deadline=None)
@given(
    rows=st.integers(1, 40),
    vocab=st.integers(1, 300),
    data=st.data(),
    dtype=st.sampled_from(DTYPES),
    use_triton=st.booleans(),
)
def test_property_random_shapes(use_backend, rows, vocab, data, dtype, use_triton):
    C = data.draw(st.integers(1, min(vocab, 40)))
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=gen) * 3).to(dtype)
    class_ids = torch.randperm(vocab, generator=gen)[:C]
    with use_backend("triton" if use_triton else "torch"):
        _check(logits, class_ids, grad_seed=seed)


def test_compiles_fullgraph_forward_and_backward(backend):
    class_ids = torch.tensor([2, 9, 4])

    def loss_fn(logits, target):
        return torch.nn.functional.nll_loss(class_log_softmax(logits, class_ids), target)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    logits = torch.randn(5, 16, requires_grad=True)
    target = torch.tensor([0, 1, 2, 0, 1])
    loss = compiled(logits, target)
    loss.backward()
    eager_logits = logits.detach().clone().requires_grad_(True)
    eager = loss_fn(eager_logits, target)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(logits.grad, eager_logits.grad)


@pytest.mark.parametrize(
    "logits,class_ids,error,match",
    [
        (torch.randn(3, 10), torch.tensor([1, 1]), ValueError, "class_ids: expected distinct"),
        (torch.randn(3, 10), torch.tensor([1, 10]), ValueError, r"class_ids: expected ids in \[0, 10\)"),
        (torch.randn(3, 10), torch.tensor([-1, 2]), ValueError, r"class_ids: expected ids in \[0, 10\)"),
        (torch.randn(3, 10), torch.tensor([], dtype=torch.int64), ValueError, "class_ids: expected a non-empty 1-D"),
        (torch.randn(3, 10), torch.tensor([[1, 2]]), ValueError, "class_ids: expected a non-empty 1-D"),
        (torch.randn(3, 10), torch.tensor([1, 2], dtype=torch.int32), TypeError, "class_ids: expected dtype int64"),
        (torch.randint(0, 5, (3, 10)), torch.tensor([1, 2]), TypeError, "logits: expected a floating tensor"),
        (torch.randn(3, 10).double(), torch.tensor([1, 2]), TypeError, "logits: expected a floating tensor"),
        (torch.randn(3, 0), torch.tensor([0]), ValueError, r"logits: expected shape \[..., V\] with V >= 1"),
        ([[0.0, 1.0]], torch.tensor([0]), TypeError, "logits: expected a torch.Tensor, got list"),
        (torch.randn(3, 10), [1, 2], TypeError, "class_ids: expected a torch.Tensor, got list"),
        (torch.randn(3, 10), torch.tensor([1, 2], device="meta"), ValueError, "class_ids: expected a tensor on cpu"),
    ],
)
def test_bad_inputs(backend, logits, class_ids, error, match):
    with pytest.raises(error, match=match):
        class_log_softmax(logits, class_ids)
