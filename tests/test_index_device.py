"""The index where search runs: ``Index.to(device)`` / ``Retrieval(device=...)``. On the CPU the
heads stay memory-mapped (the same pages, no copy); queries are moved to the index's device and
results come back there; stage 2 and ``predict`` search through ``ops.topk_similarity`` on those
heads, which under ``JOMED_FAST_BACKEND=triton`` (and the interpreter) is the Triton kernel,
checked against a float64 brute force."""

import copy

import _stage2_worker as W
import numpy as np
import pytest
import torch

from jomed_fast.candidate_retrieval import Retrieval
from jomed_fast.index import Index
from jomed_fast.retriever import QueryEncoder
from jomed_fast.train.retriever import RetrieverTrainConfig, train_retriever

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = W.build(tmp_path_factory.mktemp("device"))
    return root, W.load(root)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts launches of the Triton top-k (the function ``ops.topk_similarity`` dispatches to)."""
    from jomed_fast.kernels import topk_similarity as kernel

    calls = []
    real = kernel.topk_similarity_forward

    def counted(queries, index, k):
        calls.append((queries.device, index.data_ptr(), k))
        return real(queries, index, k)

    monkeypatch.setattr(kernel, "topk_similarity_forward", counted)
    monkeypatch.setenv("JOMED_FAST_BACKEND", "triton")
    return calls


def test_on_the_cpu_the_heads_are_the_memory_mapped_files(setup):
    root, _ = setup
    index = Index.open(root / "index").to("cpu")
    for head, array in index.embeddings.items():
        x = index.head(head)
        assert isinstance(array, np.memmap)
        assert x.data_ptr() == array.ctypes.data and x.dtype == torch.float16 and x.is_contiguous()
    assert index.device == torch.device("cpu")


def test_a_device_torch_cannot_see_is_refused_by_name(setup):
    root, _ = setup
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="device: expected an available device, got cuda"):
        Index.open(root / "index").to("cuda")


def test_retrieval_searches_the_heads_through_the_triton_kernel(setup, kernel_calls):
    root, (_, enc, _, train, _) = setup
    index = Index.open(root / "index")
    retrieval = Retrieval(index, W._generator().index_records(), device="cpu")
    with torch.no_grad():
        q = enc.encode_images([s.image for s in train[:3]])
    got = retrieval.search(q, k_text=3, k_image=2)
    assert {ptr for _, ptr, _ in kernel_calls} == {index.head("text").data_ptr(), index.head("image").data_ptr()}
    for head, cols in (("text", slice(0, 3)), ("image", slice(3, 5))):
        scores = q.to(torch.float16).double() @ torch.from_numpy(np.asarray(index.embeddings[head])).double().T
        ref = torch.sort(scores, dim=1, descending=True, stable=True)
        k = cols.stop - cols.start
        assert torch.equal(got.ids[:, cols], ref.indices[:, :k])
        torch.testing.assert_close(got.scores[:, cols].double(), ref.values[:, :k], atol=1e-5, rtol=1e-5)
    # the candidates' fixed embeddings come from the same heads, on the same device
    e = retrieval.embeddings("image", got.ids[:, 3:])
    assert e.device == retrieval.device and e.shape == (3, 2, index.dim)
    assert torch.equal(e, torch.from_numpy(np.asarray(index.embeddings["image"]))[got.ids[:, 3:]].float())


def test_stage2_searches_through_the_kernel(setup, kernel_calls, tmp_path):
    _, (reader, enc, retrieval, train, _) = setup
    cfg = RetrieverTrainConfig(
        k=4, batch_size=2, max_steps=1, refresh_every=None, alpha=None, eval_each_epoch=False, n_trainable=1,
        dedup_candidates=False,  # the search at k alone (de-duplication widens it past copies)
    )  # fmt: skip
    train_retriever(
        cfg,
        reader,
        "synthetic",
        QueryEncoder(copy.deepcopy(enc), 1, None),
        retrieval,
        train[:2],
        None,
        tmp_path,
        progress=False,
    )
    assert kernel_calls and all(k == 4 for _, _, k in kernel_calls)


def test_predict_searches_through_the_kernel(setup, kernel_calls, tmp_path):
    from jomed_fast.infer import InferConfig, predict
    from jomed_fast.scoring import CandidateScorer

    _, (reader, enc, retrieval, train, _) = setup
    scorer = CandidateScorer(reader, "synthetic", "paper")
    predict(
        scorer,
        train[:2],
        retrieval=retrieval,
        encoder=enc,
        config=InferConfig(k_text=2, k_image=1, batch_size=2),
        out_path=tmp_path / "p.jsonl",
        progress=False,
    )
    # one batch of two queries: one search per head (text k = 2, image k = 1)
    assert sorted(k for _, _, k in kernel_calls) == [1, 2]
