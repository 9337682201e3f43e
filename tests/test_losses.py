"""The loss modules: RetrievalKLLoss and HeadClassNLLLoss against float64 torch compositions."""

import math

import pytest
import torch
from conftest import TOLERANCES

from jomed_fast.ops import HeadClassNLLLoss, RetrievalKLLoss, retrieval_kl_loss

# --- RetrievalKLLoss ---------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_retrieval_kl_module_matches_float64(backend, reduction):
    gen = torch.Generator().manual_seed(0)
    scores, reader = torch.randn(7, 50, generator=gen) * 3, torch.randn(7, 50, generator=gen) * 3
    module = RetrievalKLLoss(tau_retriever=0.5, tau_reader=2.0, reduction=reduction)
    s = scores.clone().requires_grad_(True)
    out = module(s, reader)
    out.sum().backward()

    s64 = scores.double().requires_grad_(True)
    log_q = torch.log_softmax(s64 / 0.5, dim=-1)
    p = torch.softmax(reader.double() / 2.0, dim=-1)
    rows = (p * (p.log() - log_q)).sum(dim=-1)
    ref = {"batchmean": rows.mean(), "sum": rows.sum(), "none": rows}[reduction]
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(s.grad.double(), s64.grad, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out, retrieval_kl_loss(scores, reader, 0.5, 2.0, reduction))


def test_retrieval_kl_module_repr_and_defaults():
    module = RetrievalKLLoss()
    assert (module.tau_retriever, module.tau_reader, module.reduction) == (1.0, 1.0, "batchmean")
    assert "tau_retriever=1.0, tau_reader=1.0, reduction='batchmean'" in repr(module)
    assert list(module.parameters()) == [] and module.state_dict() == {}


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"tau_retriever": 0.0}, ValueError, "tau_retriever: expected a finite number > 0, got 0.0"),
        ({"tau_reader": -0.5}, ValueError, "tau_reader: expected a finite number > 0, got -0.5"),
        ({"tau_reader": math.inf}, ValueError, "tau_reader: expected a finite number > 0"),
        ({"tau_retriever": torch.tensor(1.0)}, TypeError, "tau_retriever: expected a positive number, got Tensor"),
        ({"reduction": "mean"}, ValueError, r"reduction: expected one of \('batchmean', 'sum', 'none'\), got 'mean'"),
        ({"reduction": None}, ValueError, r"reduction: expected one of .*, got None"),
    ],
)
def test_retrieval_kl_module_validates_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        RetrievalKLLoss(**kwargs)


def test_retrieval_kl_module_checks_its_inputs():
    with pytest.raises(ValueError, match=r"reader_log_likelihoods: expected shape \[B, K\] = \(2, 3\)"):
        RetrievalKLLoss()(torch.randn(2, 3), torch.randn(2, 4))


# --- HeadClassNLLLoss --------------------------------------------------------------------------


def _head_inputs(N=6, H=24, V=50, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen).to(dtype)
    weight = (torch.randn(V, H, generator=gen) / H**0.5).to(dtype)
    bias = torch.randn(V, generator=gen).to(dtype)
    return hidden, weight, bias


def _nll_float64(hidden, weight, class_ids, targets, bias):
    logits = hidden @ weight[class_ids].T
    if bias is not None:
        logits = logits + bias[class_ids]
    return torch.nn.functional.nll_loss(torch.log_softmax(logits, dim=-1), targets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_head_nll_matches_float64(backend, dtype, with_bias):
    hidden, weight, bias = _head_inputs(dtype=dtype)
    bias = bias if with_bias else None
    class_ids = torch.tensor([7, 3, 41, 0, 19])
    targets = torch.tensor([0, 4, 2, 2, 1, 3])
    module = HeadClassNLLLoss(class_ids)

    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = module(h, w, targets, bias)
    loss.backward()
    assert loss.dtype == torch.float32 and loss.shape == ()

    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref = _nll_float64(h64, w64, class_ids, targets, None if bias is None else bias.double())
    ref.backward()
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(loss.double(), ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=atol, rtol=rtol)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=atol, rtol=rtol)
    off_class = torch.ones(weight.shape[0], dtype=torch.bool)
    off_class[class_ids] = False
    assert torch.count_nonzero(w.grad[off_class]) == 0


def test_head_nll_single_class_is_zero(backend):
    hidden, weight, _ = _head_inputs()
    loss = HeadClassNLLLoss(torch.tensor([5]))(hidden, weight, torch.zeros(6, dtype=torch.int64))
    assert loss.item() == 0.0


def test_head_nll_class_ids_are_a_non_persistent_buffer():
    module = HeadClassNLLLoss(torch.tensor([4, 2]))
    assert torch.equal(module.class_ids, torch.tensor([4, 2]))
    assert "class_ids" in dict(module.named_buffers()) and module.state_dict() == {}
    assert "num_classes=2" in repr(module)


def test_head_nll_compiles_fullgraph_forward_and_backward(backend):
    module = HeadClassNLLLoss(torch.tensor([1, 8, 30]))
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    hidden, weight, bias = _head_inputs(N=5, H=16, V=40)
    targets = torch.tensor([0, 1, 2, 2, 0])
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = compiled(h, w, targets, bias)
    loss.backward()
    eager_h, eager_w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    eager = module(eager_h, eager_w, targets, bias)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(h.grad, eager_h.grad)
    torch.testing.assert_close(w.grad, eager_w.grad)


@pytest.mark.parametrize(
    "class_ids,error,match",
    [
        (torch.tensor([1, 1]), ValueError, "class_ids: expected distinct ids"),
        (torch.tensor([-1, 2]), ValueError, "class_ids: expected vocabulary ids >= 0, got min -1"),
        (torch.tensor([], dtype=torch.int64), ValueError, r"class_ids: expected a non-empty 1-D tensor \[C\]"),
        (torch.tensor([[1, 2]]), ValueError, r"class_ids: expected a non-empty 1-D tensor \[C\]"),
        (torch.tensor([1, 2], dtype=torch.int32), TypeError, "class_ids: expected dtype int64, got torch.int32"),
        ([1, 2], TypeError, "class_ids: expected a torch.Tensor, got list"),
    ],
)
def test_head_nll_validates_class_ids_at_construction(class_ids, error, match):
    with pytest.raises(error, match=match):
        HeadClassNLLLoss(class_ids)


@pytest.mark.parametrize(
    "targets,error,match",
    [
        (
            torch.tensor([0, 1, 2, 3, 0, 1]),
            ValueError,
            r"targets: expected class indices in \[0, 3\) \(C=3\), got min 0 and max 3",
        ),
        (
            torch.tensor([0, 1, -1, 0, 0, 1]),
            ValueError,
            r"targets: expected class indices in \[0, 3\) \(C=3\), got min -1",
        ),
        (
            torch.tensor([0, 1, 2]),
            ValueError,
            r"targets: expected shape \[N\] = \(6,\) \(the rows of hidden\), got \(3,\)",
        ),
        (torch.zeros(6, 1, dtype=torch.int64), ValueError, r"targets: expected shape \[N\] = \(6,\)"),
        (torch.zeros(6), TypeError, "targets: expected dtype int64"),
        ([0] * 6, TypeError, "targets: expected a torch.Tensor, got list"),
        (torch.zeros(6, dtype=torch.int64, device="meta"), ValueError, "targets: expected a tensor on cpu"),
    ],
)
def test_head_nll_bad_targets(targets, error, match):
    hidden, weight, _ = _head_inputs()
    with pytest.raises(error, match=match):
        HeadClassNLLLoss(torch.tensor([1, 2, 3]))(hidden, weight, targets)


def test_head_nll_class_id_beyond_the_vocabulary_is_reported_by_the_op():
    hidden, weight, _ = _head_inputs(V=50)
    with pytest.raises(ValueError, match=r"class_ids: expected ids in \[0, 50\)"):
        HeadClassNLLLoss(torch.tensor([1, 50]))(hidden, weight, torch.zeros(6, dtype=torch.int64))
