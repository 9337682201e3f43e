"""topk_similarity: torch (CPU) and Triton (interpreter) paths against the float64 reference.

Scores of random data are compared with tolerances and ids only where the reference's scores are
well separated (fp32 sums in another order may swap two nearly equal scores). Integer-valued data
gives exact scores on every path, so there ties are many and ids, tie order included, must match.
"""

import importlib
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jomed_fast.ops import topk_similarity, topk_similarity_reference

# The module, not the function of the same name that jomed_fast.ops exports.
topk_module = importlib.import_module("jomed_fast.ops.topk_similarity")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Inputs are rounded to the index dtype before the reference sees them, so only fp32 accumulation
# (in another order) separates a fast path from float64: scores are O(sqrt(D)) here.
SCORE_ATOL, SCORE_RTOL = 1e-3, 1e-5


def _rand(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def _check(queries, index, k):
    """Shapes, dtypes, scores against float64, ids where the scores are separated."""
    scores, ids = topk_similarity(queries, index, k)
    Q, N = queries.shape[0], index.shape[0]
    assert scores.shape == (Q, k) and scores.dtype == torch.float32
    assert ids.shape == (Q, k) and ids.dtype == torch.int64
    q64, x64 = queries.to(index.dtype).double(), index.double()
    ref_scores, ref_ids = topk_similarity_reference(q64, x64, k)
    torch.testing.assert_close(scores.double(), ref_scores, atol=SCORE_ATOL, rtol=SCORE_RTOL)
    assert ids.min() >= 0 and ids.max() < N
    assert all(len(set(row)) == k for row in ids.tolist())
    # Each id's own float64 score is the score returned for it.
    own = (q64[:, None, :] * x64[ids]).sum(-1)
    torch.testing.assert_close(scores.double(), own, atol=SCORE_ATOL, rtol=SCORE_RTOL)
    # Ids agree wherever the reference score is apart from its neighbours (the k+1-th included).
    full = torch.sort(q64 @ x64.T, dim=1, descending=True, stable=True).values
    padded = torch.cat([full, full[:, -1:] - 1], dim=1)
    gap = 4 * SCORE_ATOL
    separated = padded[:, :k] - padded[:, 1 : k + 1] > gap
    separated[:, 1:] &= padded[:, : k - 1] - padded[:, 1:k] > gap
    assert torch.equal(ids[separated], ref_ids[separated])
    return scores, ids


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "Q,N,D,k",
    [
        (5, 300, 40, 7),  # N not a multiple of any tile
        (64, 257, 32, 50),  # the retrieval shape, k=50
        (9, 130, 24, 1),  # k = 1
        (1, 37, 16, 37),  # Q = 1, k = N
        (3, 1000, 20, 100),  # k > 64: the segment path
    ],
)
def test_matches_float64(backend, dtype, Q, N, D, k):
    gen = torch.Generator().manual_seed(Q * 1000 + N)
    _check(_rand((Q, D), dtype, gen), _rand((N, D), dtype, gen), k)


def test_k_1024(backend):
    gen = torch.Generator().manual_seed(1)
    _check(_rand((3, 16), torch.float16, gen), _rand((1100, 16), torch.float16, gen), 1024)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Q,N,D,k", [(6, 300, 8, 50), (2, 400, 4, 130)])
def test_ties_lower_id_first(backend, dtype, Q, N, D, k):
    """Integer-valued embeddings: every score is exact, many are equal; ids must match the
    reference exactly, ties ordered by the lower id."""
    gen = torch.Generator().manual_seed(7)
    queries = torch.randint(-2, 3, (Q, D), generator=gen).to(dtype)
    index = torch.randint(-1, 2, (N, D), generator=gen).to(dtype)
    scores, ids = topk_similarity(queries, index, k)
    ref_scores, ref_ids = topk_similarity_reference(queries.double(), index.double(), k)
    assert torch.equal(scores.double(), ref_scores)
    assert torch.equal(ids, ref_ids)


def test_duplicate_rows_tie_across_cpu_chunks(monkeypatch):
    """The CPU path's per-chunk torch.topk picks any member of a tie; the fix-up must restore
    lower-id-first, also across chunk boundaries."""
    monkeypatch.setenv("JOMED_FAST_BACKEND", "torch")
    monkeypatch.setattr(topk_module, "_CPU_CHUNK_ROWS", 7)
    gen = torch.Generator().manual_seed(3)
    # Integer-valued rows: fp32 BLAS sums a duplicated row differently at different positions of a
    # chunk, which would break an exact tie before the tie-break is reached.
    rows = torch.randint(-3, 4, (5, 12), generator=gen).float()
    index = rows[torch.randint(0, 5, (60,), generator=gen)]  # every row 12 times on average
    queries = torch.randint(-3, 4, (4, 12), generator=gen).float()
    for k in (1, 5, 20, 60):
        scores, ids = topk_similarity(queries, index, k)
        ref_scores, ref_ids = topk_similarity_reference(queries.double(), index.double(), k)
        assert torch.equal(scores.double(), ref_scores)
        assert torch.equal(ids, ref_ids)


def _force_splits(monkeypatch, rows_per_split):
    """Run the Triton path with the index cut into splits of ``rows_per_split`` rows, as a GPU
    launch cuts it (off the GPU the launcher takes one split)."""
    monkeypatch.setenv("JOMED_FAST_BACKEND", "triton")
    from jomed_fast.kernels import topk_similarity as kernel

    monkeypatch.setattr(kernel, "_splits", lambda Q, N, cfg, device: (-(-N // rows_per_split), rows_per_split))


@pytest.mark.parametrize("rows_per_split", [200, 20])  # 4 splits; 33 splits, past one merge block
@pytest.mark.parametrize("k", [30, 90])  # the register and the segment path
def test_several_splits_merge(monkeypatch, rows_per_split, k):
    """The split merge kernel against float64, random and tied (integer-valued) data; splits
    shorter than k leave padding in their lists."""
    _force_splits(monkeypatch, rows_per_split)
    gen = torch.Generator().manual_seed(5)
    _check(_rand((3, 24), torch.float16, gen), _rand((650, 24), torch.float16, gen), k)
    queries = torch.randint(-2, 3, (3, 6), generator=gen).half()
    index = torch.randint(-1, 2, (650, 6), generator=gen).half()
    scores, ids = topk_similarity(queries, index, k)
    ref_scores, ref_ids = topk_similarity_reference(queries.double(), index.double(), k)
    assert torch.equal(scores.double(), ref_scores)
    assert torch.equal(ids, ref_ids)


@pytest.mark.parametrize("k", [30, 90])
def test_sampling_pass_floor(monkeypatch, k):
    """Long splits first search a sample (their first tiles) for a floor under each query's k-th:
    results stay exact, ties (a tie at the sample's k-th included) in id order."""
    from jomed_fast.kernels import topk_similarity as kernel

    _force_splits(monkeypatch, 300)  # 5 splits of 2 interpreter tiles; the sample is the first
    monkeypatch.setattr(kernel, "SAMPLE_MIN_TILES", 1)
    monkeypatch.setattr(kernel, "SAMPLE_TILES", 1)
    calls = []
    real = kernel._merge_splits_kernel
    monkeypatch.setattr(kernel, "_merge_splits_kernel", _Recorder(real, calls))
    gen = torch.Generator().manual_seed(11)
    _check(_rand((3, 16), torch.float16, gen), _rand((1300, 16), torch.float16, gen), k)
    assert len(calls) == 2  # the sample's merge, then the full pass's
    queries = torch.randint(-2, 3, (3, 6), generator=gen).half()
    index = torch.randint(-1, 2, (1300, 6), generator=gen).half()
    scores, ids = topk_similarity(queries, index, k)
    ref_scores, ref_ids = topk_similarity_reference(queries.double(), index.double(), k)
    assert torch.equal(scores.double(), ref_scores)
    assert torch.equal(ids, ref_ids)
    # The sample's k-th key is the floor's successor: alone in its tile of the full pass (nothing
    # else there beats the floor), it must still get in.
    values = -torch.arange(1300, dtype=torch.float32)
    values[: k - 1] = 2000 + torch.arange(k - 1, 0, -1)  # ranks 1..k-1, in split 0's sample
    values[305] = 1000  # rank k, in split 1's sample
    scores, ids = topk_similarity(torch.ones(1, 1, dtype=torch.float16), values[:, None].half(), k)
    assert ids[0, -1] == 305 and torch.equal(ids[0, :-1], torch.arange(k - 1))


class _Recorder:
    """A launched Triton kernel that records its launches."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        self.calls.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("splits", [False, True])
@pytest.mark.parametrize("N,k", [(60, 60), (300, 300)])  # every row returned: registers, segments
def test_minus_inf_and_nan_scores(monkeypatch, backend, splits, N, k):
    """-inf scores rank below every number (ties by id), NaN above, and both above the padding
    of short lists: with k = N every row comes back, in the reference's order."""
    if splits:
        if backend == "torch":
            pytest.skip("splits are the Triton path's")
        _force_splits(monkeypatch, 16)
    gen = torch.Generator().manual_seed(8)
    index = torch.randint(-3, 4, (N, 4), generator=gen).float()
    index[torch.randperm(N, generator=gen)[: N // 3], 0] = -math.inf
    index[torch.randperm(N, generator=gen)[:3], 1] = math.nan
    queries = torch.tensor([[1.0, 1.0, 2.0, -1.0], [3.0, 0.5, 1.0, 1.0]])
    scores, ids = topk_similarity(queries, index, k)
    ref_scores, ref_ids = topk_similarity_reference(queries.double(), index.double(), k)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(scores.double(), ref_scores, atol=0, rtol=0, equal_nan=True)
    assert torch.isinf(scores).any() and torch.isnan(scores).sum() == 6  # 3 NaN rows per query


def test_split_rows_fill_the_gpu_in_one_wave():
    from jomed_fast.kernels.topk_similarity import MIN_SPLIT_TILES, split_rows

    for Q, N, block_q, programs in ((1, 2_108_000, 16, 264), (64, 2_108_000, 64, 132), (200, 2_108_000, 64, 132)):
        splits, rows = split_rows(Q, N, block_q, 64, programs)
        q_blocks = -(-Q // block_q)
        assert rows % 64 == 0 and (splits - 1) * rows < N <= splits * rows  # every split has rows
        assert programs - q_blocks < q_blocks * splits <= programs + q_blocks  # one wave
    # A short index keeps MIN_SPLIT_TILES tiles per split rather than filling the GPU.
    splits, rows = split_rows(1, 64 * MIN_SPLIT_TILES * 3, 16, 64, 132)
    assert splits == 3 and rows == 64 * MIN_SPLIT_TILES
    assert split_rows(1, 10, 16, 64, 132) == (1, 64)


@pytest.mark.parametrize("k", [1, 5, 64, 65, 300])
def test_late_entrant_at_rank_k(backend, k):
    """A tile is merged only when a key beats some query's current k-th key: a row in the last tile
    that lands exactly at rank k (above the old k-th, below the (k-1)-th) must still get in."""
    N = 700
    values = -torch.arange(N, dtype=torch.float32)  # rows k-1.. : 0, -1, -2, ...
    values[: k - 1] = 1000 + torch.arange(k - 1, 0, -1)  # ranks 1..k-1, all in the first tile(s)
    values[N - 1] = 10  # rank k, in the last tile
    scores, ids = topk_similarity(torch.ones(1, 1, dtype=torch.float16), values[:, None].half(), k)
    assert ids[0, -1] == N - 1 and scores[0, -1] == 10
    assert torch.equal(ids[0, :-1], torch.arange(k - 1))


def test_gpu_block_sizes(monkeypatch):
    """The blocks and splits a GPU launch picks (BLOCK_N = 64, so many tiles per split, single-key
    inserts and full merges both; for k > 64 several list segments; Q > BLOCK_Q), run under the
    interpreter."""
    monkeypatch.setenv("JOMED_FAST_BACKEND", "triton")
    from jomed_fast.kernels import topk_similarity as kernel

    gpu_config = kernel._config
    monkeypatch.setattr(kernel, "_config", lambda Q, k, fp32: gpu_config(Q, k, fp32, interpret=False))
    monkeypatch.setattr(
        kernel, "_splits", lambda Q, N, cfg, device: kernel.split_rows(Q, N, cfg.block_q, cfg.block_n, programs=4)
    )
    gen = torch.Generator().manual_seed(9)
    for Q, N, k, dtype in (
        (3, 1100, 1, torch.float16),
        (2, 4000, 5, torch.float16),  # most tiles past the first add one key per query, or none
        (5, 1100, 50, torch.float16),
        (20, 700, 50, torch.bfloat16),
        (70, 300, 10, torch.float16),
        (5, 700, 200, torch.float32),
    ):
        _check(_rand((Q, 40), dtype, gen), _rand((N, 40), dtype, gen), k)


def test_query_dtype_is_cast_to_index_dtype(backend):
    gen = torch.Generator().manual_seed(2)
    queries = torch.randn(4, 32, generator=gen)
    index = torch.randn(90, 32, generator=gen).half()
    scores, ids = topk_similarity(queries, index, 10)
    scores_half, ids_half = topk_similarity(queries.half(), index, 10)
    assert torch.equal(scores, scores_half) and torch.equal(ids, ids_half)


def test_non_contiguous_inputs(backend):
    gen = torch.Generator().manual_seed(4)
    index = torch.randn(240, 32, generator=gen)[::2]  # strides (64, 1): rows read in place
    queries = torch.randn(32, 5, generator=gen).T  # strides (1, 5)
    _check(queries, index, 11)


@pytest.mark.parametrize("view", ["columns", "transposed"])
def test_strided_index_columns_refused_on_the_triton_path(monkeypatch, view):
    """A view whose rows are not contiguous would cost a full copy of the index (3.24 GB for the
    paper's): the Triton path refuses it by name, with the strides and the copy's size."""
    monkeypatch.setenv("JOMED_FAST_BACKEND", "triton")
    base = torch.randn(100, 48, dtype=torch.float16)
    index = base[:, ::2] if view == "columns" else torch.randn(24, 100, dtype=torch.float16).T
    strides = re.escape(str(tuple(index.stride())))
    with pytest.raises(
        ValueError, match=rf"index: expected rows of contiguous .* got strides {strides} .* = 4800 bytes"
    ):
        topk_similarity(torch.randn(2, 24, dtype=torch.float16), index, 3)
    monkeypatch.setenv("JOMED_FAST_BACKEND", "torch")  # the CPU path reads strided chunks as they are
    _check(torch.randn(2, 24, dtype=torch.float16), index, 3)


def test_large_magnitude_fp16_index(backend):
    """Scores far beyond the fp16 range: products accumulate in fp32, nothing overflows."""
    gen = torch.Generator().manual_seed(6)
    queries = _rand((3, 48), torch.float16, gen, scale=1e2)
    index = _rand((200, 48), torch.float16, gen, scale=1e2)
    scores, _ = topk_similarity(queries, index, 5)
    assert torch.isfinite(scores).all() and scores.abs().max() > 65504
    scores64, _ = topk_similarity_reference(queries.double(), index.double(), 5)
    torch.testing.assert_close(scores.double(), scores64, atol=0, rtol=1e-5)


def test_nan_index_row_ranks_first(backend):
    """Documented: a NaN score ranks above every number (as in torch.topk); it propagates."""
    gen = torch.Generator().manual_seed(8)
    queries = torch.randn(4, 16, generator=gen)
    index = torch.randn(100, 16, generator=gen)
    index[37, 3] = math.nan
    index[80] = -math.nan  # the sign bit set: must still rank first, not last
    scores, ids = topk_similarity(queries, index, 6)
    assert torch.isnan(scores[:, :2]).all() and torch.isfinite(scores[:, 2:]).all()
    assert ids[:, :2].tolist() == [[37, 80]] * 4
    ref_scores, ref_ids = topk_similarity_reference(queries.double(), index.double(), 6)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(scores[:, 2:].double(), ref_scores[:, 2:], atol=SCORE_ATOL, rtol=SCORE_RTOL)


def test_nan_query_gives_nan_scores(backend):
    queries = torch.randn(3, 8)
    queries[1, 0] = math.nan
    scores, ids = topk_similarity(queries, torch.randn(50, 8), 4)
    assert torch.isnan(scores[1]).all() and ids[1].tolist() == [0, 1, 2, 3]
    assert torch.isfinite(scores[[0, 2]]).all()


def test_no_queries_and_no_gradient(backend):
    scores, ids = topk_similarity(torch.empty(0, 8), torch.randn(10, 8), 3)
    assert scores.shape == (0, 3) and ids.shape == (0, 3)
    queries = torch.randn(2, 8, requires_grad=True)
    scores, _ = topk_similarity(queries, torch.randn(10, 8), 3)
    assert not scores.requires_grad


@settings(max_examples=10, deadline=None)
@given(
    Q=st.integers(1, 20),
    N=st.integers(1, 300),
    D=st.integers(1, 48),
    data=st.data(),
    dtype=st.sampled_from(DTYPES),
    use_triton=st.booleans(),
)
def test_property_random_shapes(use_backend, Q, N, D, data, dtype, use_triton):
    k = data.draw(st.integers(1, min(N, 100)))
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    with use_backend("triton" if use_triton else "torch"):
        _check(_rand((Q, D), dtype, gen), _rand((N, D), dtype, gen), k)


def test_compiles_fullgraph(backend):
    index = torch.randn(64, 16)

    def retrieve(queries):
        scores, ids = topk_similarity(queries * 2.0, index, 5)
        return torch.softmax(scores, dim=-1), ids + 1

    compiled = torch.compile(retrieve, fullgraph=True, backend="aot_eager")
    queries = torch.randn(3, 16)
    probs, ids = compiled(queries)
    eager_probs, eager_ids = retrieve(queries)
    torch.testing.assert_close(probs, eager_probs)
    assert torch.equal(ids, eager_ids)


def test_registered_as_custom_op():
    assert hasattr(torch.ops.jomed_fast, "topk_similarity")
    queries, index = torch.randn(2, 4), torch.randn(9, 4)
    torch.library.opcheck(torch.ops.jomed_fast.topk_similarity.default, (queries, index, 3))


_Q, _X = torch.randn(3, 8), torch.randn(20, 8)


@pytest.mark.parametrize(
    "queries,index,k,error,match",
    [
        (torch.randn(8), _X, 3, ValueError, r"queries: expected 2-D \[Q, D\]"),
        (_Q, torch.randn(2, 20, 8), 3, ValueError, r"index: expected 2-D \[N, D\]"),
        (_Q, torch.randn(20, 7), 3, ValueError, r"index: expected \[N, D\] with D = 8"),
        (_Q, torch.randn(0, 8), 1, ValueError, "index: expected a non-empty index"),
        (torch.randn(3, 0), torch.randn(5, 0), 1, ValueError, r"queries: expected \[Q, D\] with D >= 1"),
        (_Q, _X, 0, ValueError, r"k: expected 1 <= k <= min\(N, 1024\) = 20"),
        (_Q, _X, 21, ValueError, r"k: expected 1 <= k <= min\(N, 1024\) = 20 \(N=20\), got 21"),
        (_Q, torch.randn(1100, 8), 1025, ValueError, r"k: expected 1 <= k <= min\(N, 1024\) = 1024"),
        (_Q, _X, 2.0, TypeError, "k: expected an int, got float"),
        (_Q, _X, True, TypeError, "k: expected an int, got bool"),
        (_Q, _X, torch.tensor(3), TypeError, "k: expected an int, got Tensor"),
        (torch.randint(0, 5, (3, 8)), _X, 3, TypeError, "queries: expected a floating tensor"),
        (_Q, torch.randint(0, 5, (20, 8)), 3, TypeError, "index: expected a floating tensor"),
        (_Q, _X.double(), 3, TypeError, "index: expected a floating tensor"),
        ([[0.0] * 8], _X, 3, TypeError, "queries: expected a torch.Tensor, got list"),
        (_Q, torch.randn(20, 8, device="meta"), 3, ValueError, "index: expected a tensor on cpu"),
    ],
)
def test_bad_inputs(backend, queries, index, k, error, match):
    with pytest.raises(error, match=match):
        topk_similarity(queries, index, k)


def simulate_merges(queries, rows, block_n, k, rng, sample_rows=0):
    """What the search kernel does per tile of one program for i.i.d. scores: (tiles, single-key
    inserts, full merges), exactly as it decides them (count of keys above each query's k-th, or
    above the floor from a sampling pass over ``sample_rows`` rows, whichever is higher)."""
    scores = rng.standard_normal((queries, rows))
    floor = np.full((queries, 1), -np.inf)
    if sample_rows >= k:
        floor = np.sort(rng.standard_normal((queries, sample_rows)), axis=1)[:, -k : -k + 1]
    top = np.tile(floor, (1, k))  # each query's running top k, any order (the floor as entries)
    single = full = 0
    tiles = -(-rows // block_n)
    for t in range(tiles):
        tile = scores[:, t * block_n : (t + 1) * block_n]
        most = int((tile > top.min(axis=1, keepdims=True)).sum(axis=1).max())
        single += most == 1
        full += most > 1
        both = np.concatenate([top, tile], axis=1)
        top = np.partition(both, both.shape[1] - k, axis=1)[:, -k:]
    return tiles, single, full


def expected_merged_tiles(queries, rows, block_n, k):
    """Tiles in which some query gains an entry, for i.i.d. scores: row n (0-based) enters a
    query's top k with probability min(1, k / (n + 1)), independently of the other rows."""
    enters = np.minimum(1.0, k / np.arange(1, rows + 1))
    tiles = -(-rows // block_n)
    none = [np.prod(1 - enters[t * block_n : (t + 1) * block_n]) for t in range(tiles)]
    return float(np.sum(1 - np.asarray(none) ** queries))


@pytest.mark.parametrize("Q", [1, 16, 64])
@pytest.mark.parametrize("sms", [132, 142])  # H200, L40
def test_merge_rate_simulation_at_the_papers_shapes(Q, sms):
    """The merged-tile rates the kernel docstring's model uses: the launcher's split of the paper's
    index (N = 2.1M, k = 50) for each Q, one program's tiles simulated; the merged share agrees
    with its closed form; the sampling pass's floor cuts the full merges (4x or more for Q <= 16)."""
    from jomed_fast.kernels.topk_similarity import SAMPLE_TILES, _config, split_rows

    cfg = _config(Q, 50, fp32=False, interpret=False)
    programs = sms * cfg.programs_per_sm
    _, rows = split_rows(Q, 2_108_000, cfg.block_q, cfg.block_n, programs)
    queries = min(Q, cfg.block_q)
    rng = np.random.default_rng(Q)
    runs = [simulate_merges(queries, rows, cfg.block_n, 50, rng) for _ in range(4)]
    tiles = sum(r[0] for r in runs)
    single, full = sum(r[1] for r in runs), sum(r[2] for r in runs)
    expected = 4 * expected_merged_tiles(queries, rows, cfg.block_n, 50)
    assert abs((single + full) - expected) < 0.05 * tiles + 4 * expected**0.5
    assert full >= 4 * (50 // cfg.block_n + 1)  # the first tiles, before the k-th settles, merge fully
    # The sampling pass (the first SAMPLE_TILES tiles of every split): most tiles skip, or add one
    # key per query, at Q = 1; every merge costs less at Q = 16 and 64.
    splits, _ = split_rows(Q, 2_108_000, cfg.block_q, cfg.block_n, programs)
    sample_rows = splits * SAMPLE_TILES * cfg.block_n
    sampled = [simulate_merges(queries, rows, cfg.block_n, 50, rng, sample_rows) for _ in range(4)]
    sampled_single, sampled_full = sum(r[1] for r in sampled), sum(r[2] for r in sampled)
    assert sampled_full < (full / 4 if queries <= 16 else 0.8 * full)
    assert sampled_single + sampled_full <= single + full
    if queries == 1:
        assert sampled_single + sampled_full < 0.2 * tiles
