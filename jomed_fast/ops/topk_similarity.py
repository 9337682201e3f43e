"""``topk_similarity``: exact inner-product top-k search of queries against an embedding index.

``topk_similarity(queries, index, k)``: queries ``[Q, D]``, index ``[N, D]`` (fp16 / bf16 / fp32;
fp16 is the real index's storage; D, N >= 1), an int ``1 <= k <= min(N, 1024)`` -> for each query
the k index rows of largest inner product: (float32 scores ``[Q, k]`` sorted descending, int64 ids
``[Q, k]``). ``topk_similarity_reference`` (plain torch) is the specification. A bad argument is a
``TypeError`` / ``ValueError`` naming it.

* **Precision.** Queries are cast to the index dtype (the kernel's tensor-core operands are both in
  the storage dtype; a query is rounded once, as the index rows were), products accumulate in fp32.
* **Ties.** Equal scores are ordered by the lower id first, on every path (``-0.0`` equals ``+0.0``).
  Which of two *nearly* equal scores wins may differ between paths (fp32 sums in another order).
* **NaN.** A NaN score ranks above every number, as in ``torch.topk``: a NaN index row is returned
  first (it propagates; NaN never crashes), NaN queries give k NaN scores with ids ``0..k-1``.
* **Layout.** The Triton path (CUDA tensors) reads the index's rows in place: any row stride, but
  contiguous elements within a row (``index.stride(1) == 1``). A view with strided columns
  (``index[:, ::2]``, a transpose) is a ``ValueError`` naming its strides and the bytes
  ``index.contiguous()`` would copy (3.24 GB for the paper's index), never a silent copy. The CPU
  path reads such a view chunk by chunk. Queries of any layout are accepted (a ``[Q, D]`` copy).
* **Not differentiable.** Retrieval is a selection; the outputs carry no gradient (inputs are
  detached). To train through the scores, recompute them for the returned ids:
  ``(queries[:, None, :] * index[ids]).sum(-1)``.

Paths (``jomed_fast.ops``): CUDA tensors run the Triton kernel of
``jomed_fast.kernels.topk_similarity``, whose docstring holds the search (score tiles merged into a
running top-k on chip, the sortable keys, the splits and their merge, the bytes moved and the
predicted fraction of the roofline). CPU tensors run
:func:`_topk_similarity_cpu`: fp32 matmul + ``torch.topk`` over 4096-row chunks of the index (fp16 /
bf16 chunks are upcast, CPU half matmul being slow), so the ``[Q, N]`` matrix is never materialised.
Measured on the 2-core development machine for Q=64, N=200k, D=768, k=50, side by side in one
run, one thread each (the machine was shared; 2-thread timings were noisy but ordered the same):
chunked torch 0.56 s (fp32 index) / 0.60-0.69 s (fp16 index, upcast per chunk) against faiss 3.1 s
(``IndexFlatIP.search`` on a prebuilt index, and ``faiss.knn``, which also needs an fp32 copy of an
fp16 index); 2048- and 8192-row chunks were no faster than 4096. So the CPU path is torch.

The op is registered as ``torch.ops.jomed_fast.topk_similarity`` with a fake implementation, so
callers compile under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch

from ._checks import check_floating, check_ndim, check_same_device
from ._dispatch import choose_backend

_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_K = 1024
# Index rows per CPU chunk: the fp32 chunk (12 MB at D=768) and its [Q, 4096] scores stay near cache;
# the fastest of 2k / 4k / 8k on the development machine (module docstring).
_CPU_CHUNK_ROWS = 4096
# Queries per CPU block, so a huge Q never builds a [Q, chunk] score matrix of gigabytes.
_CPU_QUERY_BLOCK = 4096


def topk_similarity_reference(queries: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full score matrix ``queries @ index.T`` in at least fp32 (float64 for float64 inputs), then a
    stable descending sort: the top k scores, ties (and NaNs, which rank first) by the lower id."""
    dtype = torch.promote_types(torch.promote_types(queries.dtype, index.dtype), torch.float32)
    scores = queries.to(dtype) @ index.to(dtype).T
    values, ids = torch.sort(scores, dim=1, descending=True, stable=True)
    return values[:, :k], ids[:, :k]


def _chunk_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of ``scores`` ``[Q, C]`` (descending, ties by the lower column).

    ``torch.topk`` is fast but picks an arbitrary member of a tie at the k-th place; a row is
    ambiguous only when some score equal to its k-th was left out (or its k-th is NaN and more NaNs
    than k exist). Those rows (rare: duplicate index rows) are redone with a stable sort.
    """
    values, ids = torch.topk(scores, k, dim=1)
    kth = values[:, -1:]
    ambiguous = (scores == kth).sum(dim=1) > (values == kth).sum(dim=1)
    nan_kth = torch.isnan(kth[:, 0])
    if bool(nan_kth.any()):
        ambiguous |= nan_kth & (torch.isnan(scores).sum(dim=1) > k)
    if bool(ambiguous.any()):
        rows = ambiguous.nonzero()[:, 0]
        exact_values, exact_ids = torch.sort(scores[rows], dim=1, descending=True, stable=True)
        values[rows], ids[rows] = exact_values[:, :k], exact_ids[:, :k]
    return values, ids


def _order(values: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k of candidates ``[Q, M]`` ordered by score descending, then id ascending."""
    by_id = torch.argsort(ids, dim=1)  # ids are distinct: no stability needed
    values, ids = values.gather(1, by_id), ids.gather(1, by_id)
    by_score = torch.argsort(values, dim=1, descending=True, stable=True)[:, :k]
    return values.gather(1, by_score), ids.gather(1, by_score)


def _topk_similarity_cpu(queries: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked fp32 matmul + exact per-chunk top-k, then one ordered merge of the candidates."""
    Q, N = queries.shape[0], index.shape[0]
    q32 = queries.to(index.dtype).float()
    out_values, out_ids = [], []
    for q0 in range(0, Q, _CPU_QUERY_BLOCK):
        q_block = q32[q0 : q0 + _CPU_QUERY_BLOCK]
        values, ids = [], []
        for n0 in range(0, N, _CPU_CHUNK_ROWS):
            chunk = index[n0 : n0 + _CPU_CHUNK_ROWS].float()  # no copy for fp32
            v, i = _chunk_topk(q_block @ chunk.T, min(k, chunk.shape[0]))
            values.append(v)
            ids.append(i + n0)
        v, i = _order(torch.cat(values, dim=1), torch.cat(ids, dim=1), k)
        out_values.append(v)
        out_ids.append(i)
    if not out_values:  # Q == 0
        return q32.new_empty((0, k)), torch.empty((0, k), dtype=torch.int64, device=queries.device)
    return torch.cat(out_values), torch.cat(out_ids)


@torch.library.custom_op("jomed_fast::topk_similarity", mutates_args=())
def _forward(queries: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """queries ``[Q, D]``, index ``[N, D]`` -> (float32 ``[Q, k]``, int64 ``[Q, k]``)."""
    if choose_backend(index.device) == "triton":
        from jomed_fast.kernels.topk_similarity import topk_similarity_forward

        return topk_similarity_forward(queries, index, k)
    return _topk_similarity_cpu(queries, index, k)


@_forward.register_fake
def _(queries, index, k):
    Q = queries.shape[0]
    return queries.new_empty((Q, k), dtype=torch.float32), queries.new_empty((Q, k), dtype=torch.int64)


def topk_similarity(queries: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k index rows with the largest inner product per query: ``[Q, D]`` x ``[N, D]`` ->
    (float32 scores ``[Q, k]`` descending, int64 ids ``[Q, k]``); ties by the lower id."""
    check_floating("queries", queries, _INPUT_DTYPES)
    check_floating("index", index, _INPUT_DTYPES)
    check_ndim("queries", queries, 2, "Q, D")
    check_ndim("index", index, 2, "N, D")
    check_same_device(queries=queries, index=index)
    Q, D = queries.shape
    N = index.shape[0]
    if D == 0:
        raise ValueError(f"queries: expected [Q, D] with D >= 1, got shape {tuple(queries.shape)}")
    if index.shape[1] != D:
        raise ValueError(f"index: expected [N, D] with D = {D} (the queries' D), got shape {tuple(index.shape)}")
    if N == 0:
        raise ValueError(f"index: expected a non-empty index [N, D] with N >= 1, got shape {tuple(index.shape)}")
    if isinstance(k, bool) or not isinstance(k, (int, torch.SymInt)):
        raise TypeError(f"k: expected an int, got {type(k).__name__}")
    if not 1 <= k <= min(N, MAX_K):
        raise ValueError(f"k: expected 1 <= k <= min(N, {MAX_K}) = {min(N, MAX_K)} (N={N}), got {k}")
    return _forward(queries.detach(), index.detach(), k)
