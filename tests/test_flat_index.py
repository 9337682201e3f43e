"""FlatIndex against faiss.IndexFlatIP: the same ids and scores (fp32 storage on the data, fp16
storage against faiss on the fp16-rounded data), the same padding past ntotal, NumPy / torch in and
out, a loop written for faiss running unchanged on it, save / load with a damaged file refused, the
op's NaN rule, and the Triton path under the interpreter.

Rows and queries are unit vectors (as retrieval embeddings are), so scores are O(1) and fp32 sums in
another order differ by ~1e-7; ids are compared wherever faiss's scores are apart from their
neighbours (two nearly equal scores may swap between the two).
"""

import json

import numpy as np
import pytest
import torch

from jomed_fast._manifest import MANIFEST, CorruptFile
from jomed_fast.index import FlatIndex
from jomed_fast.index.flat import PAD_ID, PAD_SCORE, VECTORS_FILE
from jomed_fast.ops import topk_similarity_reference

SCORE_ATOL = 1e-5
TIE_GAP = 1e-4
DTYPES = [torch.float32, torch.float16]


def _unit_rows(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _as_stored(x, dtype):
    """What faiss must see to search the same data as a FlatIndex of ``dtype``: the rows rounded to it."""
    return x.astype(np.float16).astype(np.float32) if dtype == torch.float16 else x


def _faiss_search(x, q, k):
    faiss = pytest.importorskip("faiss")
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(np.ascontiguousarray(x, dtype=np.float32))
    return index.search(np.ascontiguousarray(q, dtype=np.float32), k)


def _assert_matches(scores, ids, faiss_scores, faiss_ids):
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and scores.shape == ids.shape == faiss_scores.shape
    np.testing.assert_allclose(scores, faiss_scores, rtol=0, atol=SCORE_ATOL)
    # An id is compared where faiss's score is apart from the one above and the one below it.
    padded = np.concatenate([faiss_scores, faiss_scores[:, -1:] - 1], axis=1)
    below = padded[:, :-1] - padded[:, 1:] > TIE_GAP
    above = np.concatenate([np.ones_like(below[:, :1]), below[:, :-1]], axis=1)
    separated = below & above
    assert separated.mean() > 0.9  # the comparison is not vacuous
    np.testing.assert_array_equal(ids[separated], faiss_ids[separated])


@pytest.mark.parametrize("dtype", DTYPES)
def test_search_matches_faiss(dtype):
    rng = np.random.default_rng(0)
    x, q = _unit_rows(rng, 3000, 64), _unit_rows(rng, 40, 64)
    index = FlatIndex(64, dtype=dtype)
    for lo in range(0, 3000, 700):  # several adds: the storage grows
        index.add(x[lo : lo + 700])
    assert index.ntotal == 3000 and index.d == 64 and index.vectors.is_contiguous()
    scores, ids = index.search(q, 20)
    _assert_matches(scores, ids, *_faiss_search(_as_stored(x, dtype), _as_stored(q, dtype), 20))


@pytest.mark.parametrize("dtype", DTYPES)
def test_search_matches_faiss_on_each_backend(backend, dtype):
    rng = np.random.default_rng(1)
    x, q = _unit_rows(rng, 70, 16), _unit_rows(rng, 3, 16)
    index = FlatIndex(16, dtype=dtype)
    index.add(torch.from_numpy(x))
    scores, ids = index.search(q, 5)
    _assert_matches(scores, ids, *_faiss_search(_as_stored(x, dtype), _as_stored(q, dtype), 5))


def test_k_above_ntotal_pads_as_faiss():
    rng = np.random.default_rng(2)
    x, q = _unit_rows(rng, 6, 8), _unit_rows(rng, 4, 8)
    index = FlatIndex(8, dtype=torch.float32)
    index.add(x)
    scores, ids = index.search(q, 9)
    faiss_scores, faiss_ids = _faiss_search(x, q, 9)
    np.testing.assert_array_equal(ids, faiss_ids)
    np.testing.assert_array_equal(scores[:, 6:], faiss_scores[:, 6:])  # faiss's -FLT_MAX, bit for bit
    np.testing.assert_allclose(scores[:, :6], faiss_scores[:, :6], rtol=0, atol=SCORE_ATOL)
    assert (ids[:, 6:] == PAD_ID).all() and (scores[:, 6:] == PAD_SCORE).all()
    torch_scores, torch_ids = index.search(torch.from_numpy(q), 9)
    assert torch.equal(torch_ids, torch.from_numpy(ids)) and torch.equal(torch_scores, torch.from_numpy(scores))


def test_numpy_in_numpy_out_torch_in_torch_out():
    rng = np.random.default_rng(3)
    x, q = _unit_rows(rng, 200, 24), _unit_rows(rng, 7, 24)
    read_only = x.copy()
    read_only.setflags(write=False)  # as a memory-mapped corpus
    index = FlatIndex(24)
    index.add(read_only[:100])
    index.add(torch.from_numpy(x[100:]).double())  # any float dtype, stored in the index's
    assert index.vectors.dtype == torch.float16
    assert torch.equal(index.vectors, torch.from_numpy(x).half())
    scores, ids = index.search(q, 10)
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float32 and ids.dtype == np.int64
    for queries in (torch.from_numpy(q), torch.from_numpy(q).double(), torch.from_numpy(q).half()):
        torch_scores, torch_ids = index.search(queries, 10)
        assert (
            isinstance(torch_scores, torch.Tensor)
            and torch_scores.dtype == torch.float32
            and torch_ids.dtype == torch.int64
        )
        assert torch_scores.device == index.device
        # queries are rounded to fp16 first on every input type, so all of them search alike
        assert torch.equal(torch_ids, torch.from_numpy(ids)) and torch.equal(torch_scores, torch.from_numpy(scores))
    for queries in (q.astype(np.float64), q.astype(np.float16)):
        scores2, ids2 = index.search(queries, 10)
        assert scores2.dtype == np.float32 and np.array_equal(ids2, ids) and np.array_equal(scores2, scores)
    empty_scores, empty_ids = index.search(q[:0], 10)
    assert empty_scores.shape == empty_ids.shape == (0, 10)


def test_ties_by_lowest_id_and_nan_rows_first_as_the_op():
    x = np.zeros((6, 4), dtype=np.float32)
    x[:, 0] = [1, 2, 2, np.nan, 2, np.inf]
    q = np.array([[1, 0, 0, 0], [-1, 0, 0, 0]], dtype=np.float32)
    index = FlatIndex(4, dtype=torch.float32)
    index.add(x)
    scores, ids = index.search(q, 6)
    want_scores, want_ids = topk_similarity_reference(torch.from_numpy(q).double(), torch.from_numpy(x).double(), 6)
    np.testing.assert_array_equal(ids, want_ids.numpy())
    np.testing.assert_array_equal(scores, want_scores.float().numpy())
    assert ids[0].tolist() == [3, 5, 1, 2, 4, 0]  # NaN first, then inf, then the tie by id


def test_a_loop_written_for_faiss_runs_unchanged_on_flat_index():
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(4)
    corpus, queries = _unit_rows(rng, 1500, 32), _unit_rows(rng, 50, 32)
    labels = rng.integers(0, 5, size=1500)

    def knn_vote(make_index, k=7, batch=16):
        """Written against faiss: add in blocks, search in batches, vote with the neighbours' labels."""
        index = make_index(corpus.shape[1])
        for lo in range(0, len(corpus), 400):
            index.add(corpus[lo : lo + 400])
        assert index.ntotal == len(corpus) and index.d == corpus.shape[1]
        found_ids, votes = [], []
        for lo in range(0, len(queries), batch):
            scores, ids = index.search(queries[lo : lo + batch], k)
            weights = np.exp(scores)
            votes.append(np.stack([(weights * (labels[ids] == c)).sum(1) for c in range(5)], 1).argmax(1))
            found_ids.append(ids)
        index.reset()
        assert index.ntotal == 0
        return np.concatenate(found_ids), np.concatenate(votes)

    faiss_ids, faiss_votes = knn_vote(faiss.IndexFlatIP)
    ids, votes = knn_vote(lambda d: FlatIndex(d, dtype=torch.float32))
    np.testing.assert_array_equal(ids, faiss_ids)
    np.testing.assert_array_equal(votes, faiss_votes)


def test_no_gradient_and_the_recomputed_scores_carry_one():
    rng = np.random.default_rng(5)
    index = FlatIndex(12, dtype=torch.float32)
    index.add(_unit_rows(rng, 30, 12))
    q = torch.from_numpy(_unit_rows(rng, 3, 12)).requires_grad_()
    scores, ids = index.search(q, 4)
    assert not scores.requires_grad
    recomputed = (q[:, None, :] * index.vectors[ids]).sum(-1)
    torch.testing.assert_close(recomputed, scores, atol=SCORE_ATOL, rtol=0)
    recomputed.sum().backward()
    torch.testing.assert_close(q.grad, index.vectors[ids].sum(1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_save_load_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(6)
    x, q = _unit_rows(rng, 50, 10), _unit_rows(rng, 4, 10)
    index = FlatIndex(10, dtype=dtype)
    index.add(x[:20])
    index.add(x[20:])  # saved from a grown buffer: only the ntotal rows
    index.save(tmp_path / "ix")
    assert sorted(p.name for p in (tmp_path / "ix").iterdir()) == sorted([MANIFEST, VECTORS_FILE])
    assert VECTORS_FILE in json.loads((tmp_path / "ix" / MANIFEST).read_text())["files"]
    loaded = FlatIndex.load(tmp_path / "ix")
    assert (loaded.d, loaded.ntotal, loaded.dtype) == (10, 50, dtype)
    assert torch.equal(loaded.vectors, index.vectors)
    for got, want in zip(loaded.search(q, 5), index.search(q, 5)):
        np.testing.assert_array_equal(got, want)
    loaded.add(x[:1])  # a loaded index grows like any other
    assert loaded.ntotal == 51
    index.reset()
    index.save(tmp_path / "ix")  # an empty index too, over the old directory
    assert FlatIndex.load(tmp_path / "ix").ntotal == 0


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "remove"])
def test_load_refuses_a_damaged_file_naming_it(tmp_path, damage):
    index = FlatIndex(8)
    index.add(_unit_rows(np.random.default_rng(7), 40, 8))
    file = index.save(tmp_path / "ix") / VECTORS_FILE
    data = bytearray(file.read_bytes())
    if damage == "flip a byte":
        data[-5] ^= 0x01
        file.write_bytes(bytes(data))
    elif damage == "truncate":
        file.write_bytes(bytes(data[:-16]))
    else:
        file.unlink()
    with pytest.raises(CorruptFile) as raised:
        FlatIndex.load(tmp_path / "ix")
    message = str(raised.value)
    assert str(file) in message and "\n" not in message


def test_load_refuses_another_safetensors_file_naming_it(tmp_path):
    from safetensors.torch import save_file

    from jomed_fast._files import replace_dir_atomically

    def fill(tmp):
        save_file({"weight": torch.zeros(3, 4)}, str(tmp / VECTORS_FILE))

    replace_dir_atomically(tmp_path / "other", fill)  # manifest matches: the content is foreign
    with pytest.raises(CorruptFile, match=rf"{VECTORS_FILE}: expected a jomed-flat-index-v1 file"):
        FlatIndex.load(tmp_path / "other")
    with pytest.raises(CorruptFile, match=f"has no {MANIFEST}"):
        (tmp_path / "other" / MANIFEST).unlink()
        FlatIndex.load(tmp_path / "other")
    with pytest.raises(ValueError, match="path: expected a directory written by FlatIndex.save"):
        FlatIndex.load(tmp_path / "missing")


def test_errors_name_the_argument():
    index = FlatIndex(4)
    with pytest.raises(ValueError, match=r"search: the index is empty \(ntotal = 0\)"):
        index.search(np.zeros((1, 4), np.float32), 1)
    index.add(np.eye(4, dtype=np.float32))
    cases = [
        (lambda: index.add(np.zeros((2, 5), np.float32)), ValueError, r"x: expected a 2-D array \[N, 4\].*\(2, 5\)"),
        (lambda: index.add(np.zeros(4, np.float32)), ValueError, r"x: expected a 2-D array \[N, 4\].*\(4,\)"),
        (lambda: index.add(np.zeros((2, 4), np.int64)), TypeError, "x: expected a floating array.*int64"),
        (lambda: index.add([[0.0] * 4]), TypeError, "x: expected a numpy.ndarray or torch.Tensor.*list"),
        (lambda: index.search(np.zeros((1, 3), np.float32), 1), ValueError, r"q: expected .*\[Q, 4\].*\(1, 3\)"),
        (lambda: index.search(np.zeros(4, np.float32), 1), ValueError, r"got shape \(4,\) \(one query: q.reshape"),
        (lambda: index.search(torch.zeros(1, 4, dtype=torch.int32), 1), TypeError, "q: expected a floating tensor"),
        (lambda: index.search(np.zeros((1, 4), np.float32), 0), ValueError, "k: expected 1 <= k <= 1024, got 0"),
        (lambda: index.search(np.zeros((1, 4), np.float32), 1025), ValueError, "k: expected 1 <= k <= 1024"),
        (lambda: index.search(np.zeros((1, 4), np.float32), 2.0), TypeError, "k: expected an int, got float"),
        (lambda: index.search(np.zeros((1, 4), np.float32), True), TypeError, "k: expected an int, got True"),
        (lambda: FlatIndex(0), ValueError, "d: expected an int >= 1, got 0"),
        (lambda: FlatIndex(4, dtype=torch.bfloat16), TypeError, "dtype: expected torch.float16 or torch.float32"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    assert index.ntotal == 4  # failed adds left it as it was
    scores, ids = index.search(np.ones((1, 4), np.float32), np.int64(2))  # NumPy integers, as faiss takes
    assert ids.tolist() == [[0, 1]]


def test_fp16_storage_refuses_values_it_would_turn_into_infinity():
    index = FlatIndex(3)
    rows = np.array([[1.0, 2.0, 3.0], [0.0, 7e4, 0.0]], dtype=np.float32)
    with pytest.raises(ValueError, match=r"x: expected values float16 can hold .* got 70000 in row 1.*float32"):
        index.add(rows)
    assert index.ntotal == 0
    index.add(np.array([[65504.0, np.inf, np.nan]], dtype=np.float32))  # the largest half, and non-finite as given
    stored = index.vectors[0].tolist()
    assert stored[0] == 65504.0 and stored[1] == float("inf") and np.isnan(stored[2])
    wide = FlatIndex(3, dtype=torch.float32)
    wide.add(rows)
    assert wide.vectors[1, 1] == 7e4


def test_to_moves_the_index():
    index = FlatIndex(4)
    index.add(np.eye(4, dtype=np.float32))
    assert index.to("cpu") is index
    meta = index.to("meta")
    assert meta is not index and meta.device.type == "meta" and meta.ntotal == 4 and meta.dtype == index.dtype
    assert index.device.type == "cpu" and index.ntotal == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_index_searches_as_the_cpu_one():
    rng = np.random.default_rng(8)
    x, q = _unit_rows(rng, 500, 32), _unit_rows(rng, 9, 32)
    cpu = FlatIndex(32)
    cpu.add(x)
    gpu = cpu.to("cuda")
    scores, ids = gpu.search(torch.from_numpy(q), 10)
    assert scores.device.type == "cuda"
    want_scores, want_ids = cpu.search(q, 10)
    _assert_matches(scores.cpu().numpy(), ids.cpu().numpy(), want_scores, want_ids)
