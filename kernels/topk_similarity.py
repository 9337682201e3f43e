r"""Exact inner-product top-k search, streaming the index once.

Given queries ``q`` ``[Q, D]`` and an index ``x`` ``[N, D]`` (fp16 / bf16 / fp32; queries are cast to
the index dtype), for every query ``i`` return the k largest scores and their row ids

.. math::

    s_{i,n} = \sum_d q_{i,d}\, x_{n,d} \quad (\text{fp32 accumulation}), \qquad
    (\text{scores}_i, \text{ids}_i) = \operatorname{top\text{-}k}_n\, s_{i,n},

sorted by score descending, ties broken by the lower id first. The ``[Q, N]`` score matrix is never
written to memory: each program owns ``BLOCK_Q`` queries and a contiguous split of the index rows;
it computes one ``[BLOCK_Q, BLOCK_N]`` tile of scores with ``tl.dot`` (a loop over ``BLOCK_D`` slices
of D), and merges the tile into a running top-k kept on chip. Bytes moved: the index once per
query block (``ceil(Q / BLOCK_Q) * N * D * elem``), plus ``splits * Q * KPAD * 8`` of candidates.

**Sortable keys.** A (score, id) pair is packed into one int64 so that one integer comparison orders
by score descending, then id ascending, and every key is distinct:

    high 32 bits: the float32 score's bits, negatives' magnitude bits inverted (monotone in the score)
    low  32 bits: 0xFFFFFFFF - id                                           (lower id = larger key)

``-0.0`` is canonicalised to ``+0.0`` (torch orders them as equal), and NaN (of either sign) to
the largest key, so a NaN score ranks first, as ``torch.topk`` / ``torch.sort`` rank it. Rows past N (and queries past Q)
get ``KEY_MIN``, below every real key, so they never enter a top-k (k <= N).

**Merging a tile** (two code paths, chosen by the constexpr ``KPAD``):

* ``KPAD <= BLOCK_N`` (k <= 64, the retrieval case): the running list ``top`` ``[BLOCK_Q, KPAD]``
  (descending) lives in registers. The tile's top KPAD are selected *ascending* (bitonic top-k);
  ``max(top, tile_top)`` of a descending and an ascending run is a bitonic run holding the top KPAD
  of the union (Batcher's half-cleaner), and log2 KPAD compare-exchange rounds sort it again.
* ``KPAD > BLOCK_N`` (k > 64): a list of up to 1024 int64 per query does not fit in registers next
  to the tile, so it lives in this program's slice of the output buffer, as ``ceil(k / BLOCK_N)``
  sorted segments of ``BLOCK_N``. The whole tile, sorted ascending, is a "carry" merged through the
  segments in order: segment ``j`` keeps ``max(seg_j, carry)`` (the top half of their union), the
  carry keeps ``min`` (the bottom half), each bitonic and re-sorted. This is a block merge of two
  sorted lists: after the last segment the list is the top of the union. A segment whose smallest
  key beats the carry's largest in every row is left as it is.

Either way a tile is merged only when one of its keys beats some query's current k-th key
(``thr``); after the first few tiles almost none do (for random data a tile of ``BLOCK_N`` rows
after ``n`` rows adds about ``BLOCK_Q * BLOCK_N * k / n`` entries), so the sort work, which can cost
more than the tile's ``tl.dot``, is skipped for most of the index. Entries past k in the list may
then be stale; the first k stay exact (a skipped key is below the k-th, so it is not in the top k).

The sorting networks are triton.language.standard's bitonic ones with one change: the partner of
an element in a compare-exchange round is found with a sum (``a + b - a``, exact in wrapping int64)
rather than ``xor_sum``, which the interpreter reduces element by element in Python.

The launcher merges the splits' first-k keys with ``torch.topk`` (``[Q, splits * k]``, keys are
distinct, so the order is exact) and decodes scores and ids from the keys. fp32 indexes use
``input_precision="ieee"`` (no TF32), so fp32 scores are fp32-exact sums.

Layout: kernel -> launcher -> ``aot_specs()``; the contract (shapes, dtypes, ties, NaN, errors), the
torch reference and the CPU path live in ``jomed_fast/ops/topk_similarity.py``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._triton_utils import AotSpec, interpreter_enabled

KEY_MIN = tl.constexpr(-(2**63))
KEY_MAX = tl.constexpr(2**63 - 1)
# Largest k whose running list stays in registers; above it the list lives in the output buffer.
REGISTER_KPAD_MAX = 64
MAX_K = 1024
# Register limit of every GPU launch (PTX .maxnreg). Without one, ptxas holds an 8-warp program at
# 128 registers (two programs per SM) when it needs a little more, and spills the rest: 8-48 bytes
# in 4 to 6 of the 10 configs once D is a multiple of 16, under Triton 3.7, 3.8 and 3.9 alike. With the limit it allocates what the merge needs (96-222 registers, one
# program per SM above 128) and spills nothing.
MAXNREG = 255


@triton.constexpr_function
def _log2(n):
    return int(n).bit_length() - 1


# Sorting networks on int64 keys along the last dimension of a [R, L] tensor (R, L powers of two),
# after triton.language.standard's bitonic sort: the tensor is viewed as a hypercube [2, 2, ..., 2]
# and a compare-exchange round works on one of its size-2 dimensions. The partner of an element is
# found with a sum (a + b - a = b, exact with wrapping int64 adds) instead of the standard library's
# xor_sum: the interpreter runs xor reductions element by element in Python, sums in numpy. The
# compiled code is the same shape (one butterfly reduction per round).


@triton.jit
def _indicator(n_dims: tl.constexpr, j: tl.constexpr):
    """0 for the left, 1 for the right element of each pair along the j-th innermost dimension."""
    ar = tl.arange(0, 2)
    return tl.reshape(ar, [1] * (n_dims - j - 1) + [2] + [1] * j)


@triton.jit
def _compare_exchange(h, flip, i: tl.constexpr):
    n_dims: tl.constexpr = _log2(h.numel)
    other = tl.sum(h, axis=n_dims - 1 - i, keep_dims=True) - h
    is_right = _indicator(n_dims, i)
    return tl.where((h > other) != (flip ^ is_right).to(tl.int1), other, h)


@triton.jit
def _bitonic_rounds(h, stage: tl.constexpr, order: tl.constexpr):
    """Sort each bitonic run of 2**stage innermost elements; order 0 ascending, 1 descending,
    2 alternating between neighbouring runs (to build the next, twice longer bitonic runs)."""
    if order == 2:
        flip = _indicator(_log2(h.numel), stage)
    else:
        flip = order
    for i in tl.static_range(stage):
        h = _compare_exchange(h, flip, stage - 1 - i)
    return h


@triton.jit
def _top_keys(x, K: tl.constexpr, DESCENDING: tl.constexpr):
    """The K largest keys of each row of ``x`` [R, L] (K <= L), sorted in the given order.

    Bitonic top-k: sort runs of K alternately up and down, then repeatedly keep the elementwise max
    of neighbouring runs (a bitonic run holding the top K of both) and re-sort it. K = L is a sort.
    """
    log_n: tl.constexpr = _log2(x.shape[1])
    log_k: tl.constexpr = _log2(K)
    h = tl.reshape(x, [2] * _log2(x.numel))
    for i in tl.static_range(1, log_k + 1):
        h = _bitonic_rounds(h, i, 2 if i < log_n else DESCENDING)
    for i in tl.static_range(log_k + 1, log_n + 1):
        h = tl.max(h, axis=_log2(h.numel) - 1 - log_k)
        h = _bitonic_rounds(h, log_k, 2 if i < log_n else DESCENDING)
    return tl.reshape(h, [x.shape[0], K])


@triton.jit
def _bitonic_sort_rows(x, DESCENDING: tl.constexpr):
    """Sort each row of ``x`` [R, L] whose rows are bitonic (log2 L compare-exchange rounds)."""
    h = tl.reshape(x, [2] * _log2(x.numel))
    h = _bitonic_rounds(h, _log2(x.shape[1]), DESCENDING)
    return tl.reshape(h, x.shape)


@triton.jit
def _score_keys(
    q_ptr,
    x_ptr,
    rows_q,
    q_ok,
    n0,
    n_end,
    D,
    stride_qm,
    stride_xn,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Sortable int64 keys of the score tile ``q[rows_q] . x[n0:n0+BLOCK_N]`` ``[BLOCK_Q, BLOCK_N]``;
    rows from ``n_end`` on (past N, or in the next split) get ``KEY_MIN``."""
    rows_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = rows_n < n_end
    acc = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = cols_d < D
        q = tl.load(
            q_ptr + rows_q.to(tl.int64)[:, None] * stride_qm + cols_d[None, :],
            mask=q_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        # int64 offsets: N * D passes 2**31 for a few million 768-d rows.
        x = tl.load(
            x_ptr + rows_n.to(tl.int64)[:, None] * stride_xn + cols_d[None, :],
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if DOT_FP32:  # the interpreter computes bf16 tl.dot wrongly; fp32 products of bf16 values are exact
            q = q.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(q, tl.trans(x), acc, input_precision=INPUT_PRECISION)
    # Equal scores need equal high words, so -0.0 becomes +0.0 (-0.0 + 0.0 = +0.0). A sum of -0.0
    # products is -0.0 when the compiler drops the zero accumulator of the first dot (Hopper wgmma
    # with the accumulator disabled); the interpreter always adds it, so no test reaches this line.
    s = acc + 0.0
    bits = s.to(tl.int32, bitcast=True)
    high = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # order-preserving as a signed int
    high = tl.where(s != s, 0x7FFFFFFF, high)  # NaN ranks first, as in torch.topk
    key = (high.to(tl.int64) << 32) | (4294967295 - rows_n.to(tl.int64))[None, :]
    return tl.where(q_ok[:, None] & n_ok[None, :], key, KEY_MIN)


@triton.jit
def _topk_similarity_kernel(
    q_ptr,
    x_ptr,
    out_ptr,
    Q,
    N,
    D,
    k,
    rows_per_split,
    stride_qm,
    stride_xn,
    stride_os,
    stride_oq,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    KPAD: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """out ``[splits, Q, >= KPAD]`` int64: the split's keys, its first k exact and descending."""
    pid_q = tl.program_id(0)
    split = tl.program_id(1)
    rows_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = rows_q < Q
    n_start = split * rows_per_split
    n_end = tl.minimum(N, n_start + rows_per_split)
    out_rows = out_ptr + split.to(tl.int64) * stride_os + rows_q.to(tl.int64)[:, None] * stride_oq
    thr = tl.full((BLOCK_Q,), KEY_MIN, tl.int64)  # each query's current k-th key

    if KPAD <= BLOCK_N:
        cols = tl.arange(0, KPAD)
        top = tl.full((BLOCK_Q, KPAD), KEY_MIN, tl.int64)
        for n0 in range(n_start, n_end, BLOCK_N):
            keys = _score_keys(
                q_ptr,
                x_ptr,
                rows_q,
                q_ok,
                n0,
                n_end,
                D,
                stride_qm,
                stride_xn,
                BLOCK_Q,
                BLOCK_N,
                BLOCK_D,
                DOT_FP32,
                INPUT_PRECISION,
            )
            if tl.max((keys > thr[:, None]).to(tl.int32)) > 0:
                # top descending, tile's top ascending: their elementwise max is bitonic and holds
                # the top KPAD of the union.
                top = _bitonic_sort_rows(tl.maximum(top, _top_keys(keys, KPAD, 0)), 1)
                thr = tl.min(tl.where(cols[None, :] < k, top, KEY_MAX), axis=1)
        tl.store(out_rows + cols[None, :], top, mask=q_ok[:, None])
    else:
        cols = tl.arange(0, BLOCK_N)
        n_seg = tl.cdiv(k, BLOCK_N)
        empty = tl.full((BLOCK_Q, BLOCK_N), KEY_MIN, tl.int64)
        for j in range(0, n_seg):
            tl.store(out_rows + j * BLOCK_N + cols[None, :], empty, mask=q_ok[:, None])
        for n0 in range(n_start, n_end, BLOCK_N):
            keys = _score_keys(
                q_ptr,
                x_ptr,
                rows_q,
                q_ok,
                n0,
                n_end,
                D,
                stride_qm,
                stride_xn,
                BLOCK_Q,
                BLOCK_N,
                BLOCK_D,
                DOT_FP32,
                INPUT_PRECISION,
            )
            if tl.max((keys > thr[:, None]).to(tl.int32)) > 0:
                carry = _top_keys(keys, BLOCK_N, 0)  # the whole tile, ascending
                new_thr = tl.full((BLOCK_Q,), KEY_MIN, tl.int64)
                for j in range(0, n_seg):
                    # Other threads of this program wrote the segment: make their stores visible.
                    tl.debug_barrier()
                    seg = tl.load(out_rows + j * BLOCK_N + cols[None, :], mask=q_ok[:, None], other=KEY_MIN)
                    if tl.max((tl.max(carry, axis=1) > tl.min(seg, axis=1)).to(tl.int32)) > 0:
                        # seg descending, carry ascending: max / min are the top / bottom halves of
                        # their union, each bitonic.
                        seg_new = _bitonic_sort_rows(tl.maximum(seg, carry), 1)
                        carry = _bitonic_sort_rows(tl.minimum(seg, carry), 0)
                        tl.debug_barrier()  # every thread has read the old segment before it is overwritten
                        tl.store(out_rows + j * BLOCK_N + cols[None, :], seg_new, mask=q_ok[:, None])
                        seg = seg_new
                    at_k = cols[None, :] + j * BLOCK_N == k - 1
                    new_thr = tl.maximum(new_thr, tl.max(tl.where(at_k, seg, KEY_MIN), axis=1))
                thr = new_thr


def decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 keys -> (float32 scores, int64 ids); the inverse of the kernel's encoding."""
    high = (keys >> 32).to(torch.int32)
    bits = high ^ ((high >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32), 0xFFFFFFFF - (keys & 0xFFFFFFFF)


def _config(Q: int, k: int, fp32: bool, interpret: bool | None = None) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_Q, BLOCK_N, BLOCK_D, KPAD, num_warps, num_stages) for Q queries, top-k, the index dtype.

    k <= 64 (KPAD 64) keeps the running list in registers; k > 64 takes the segment path, whose
    code does not depend on KPAD (1024 names the bucket, so one compile serves every k). 64 queries per program read the index once
    for a batch of up to 64 queries; Q <= 16 (one query per sample at inference) takes 16-query
    programs, whose merges sort 4x fewer rows. An fp32 index (an ``ieee`` FMA dot, not the storage
    dtype) keeps the large blocks: with 16 or 32 queries its program spills to the stack on sm_89;
    and it runs one stage: the second, pipelined stage (the next x tile and its addresses in
    flight beside the FMA dot's operand slices) takes the segment path past 255 registers into
    spills under Triton 3.7 and 3.8. BLOCK_D = 32, 8 warps and ``MAXNREG`` keep every shipped
    config free of spills on sm_89 / sm_90 (see ``aot_specs``).
    Under the interpreter, whose cost is per program and per op, blocks are as large as the shapes
    allow.
    """
    interpret = interpreter_enabled() if interpret is None else interpret
    kpad = REGISTER_KPAD_MAX if k <= REGISTER_KPAD_MAX else MAX_K  # one compile per path
    if interpret:
        return min(64, max(16, triton.next_power_of_2(Q))), 256, 128, kpad, 4, 1
    small = Q <= 16 and not fp32
    stages = 1 if fp32 else 2
    if kpad <= REGISTER_KPAD_MAX:
        return (16 if small else 64), 64, 32, kpad, 8, stages
    return (16 if small else 32), 64, 32, kpad, 8, stages


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _splits(Q: int, N: int, block_q: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """(splits, rows_per_split): enough programs to fill the GPU (about 4 per SM) when Q is small,
    each split at least 8 tiles long so its merges stay amortised; one split under the interpreter."""
    tiles = triton.cdiv(N, block_n)
    if device.type != "cuda":
        return 1, tiles * block_n
    programs_per_split = triton.cdiv(Q, block_q)
    want = triton.cdiv(4 * _sm_count(device.index or 0), programs_per_split)
    splits = max(1, min(want, tiles // 8))
    rows_per_split = triton.cdiv(tiles, splits) * block_n
    return triton.cdiv(N, rows_per_split), rows_per_split


def topk_similarity_forward(queries: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """queries ``[Q, D]``, index ``[N, D]`` -> (float32 scores ``[Q, k]`` descending, int64 ids ``[Q, k]``)."""
    Q, D = queries.shape
    N = index.shape[0]
    if Q == 0:
        return (
            torch.empty((0, k), device=index.device, dtype=torch.float32),
            torch.empty((0, k), device=index.device, dtype=torch.int64),
        )
    if index.stride(1) != 1:
        index = index.contiguous()
    q = queries.to(index.dtype)
    if q.stride(1) != 1:
        q = q.contiguous()
    block_q, block_n, block_d, kpad, num_warps, num_stages = _config(Q, k, index.dtype == torch.float32)
    splits, rows_per_split = _splits(Q, N, block_q, block_n, index.device)
    width = kpad if kpad <= block_n else triton.cdiv(k, block_n) * block_n
    keys = torch.empty((splits, Q, width), device=index.device, dtype=torch.int64)
    _topk_similarity_kernel[(triton.cdiv(Q, block_q), splits)](
        q,
        index,
        keys,
        Q,
        N,
        D,
        k,
        rows_per_split,
        q.stride(0),
        index.stride(0),
        keys.stride(0),
        keys.stride(1),
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        KPAD=kpad,
        DOT_FP32=interpreter_enabled(),
        INPUT_PRECISION="ieee" if index.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
        maxnreg=MAXNREG,
    )
    # Each split's first k keys are its exact top-k; keys are distinct, so topk's order is exact.
    cand = keys[:, :, :k]
    if splits > 1:
        cand = torch.topk(cand.permute(1, 0, 2).reshape(Q, splits * k), k, dim=1).values
    else:
        cand = cand[0]
    return decode_keys(cand)


def aot_specs() -> list[AotSpec]:
    """Every configuration the launcher can pick on a GPU: each index dtype x (Q <= 16, Q > 16) x
    (k <= 64 in registers, k > 64 on the segment path, one compile for every KPAD up to 1024).
    D (768 in the paper's index; any real embedding width) and the row strides made of it are
    multiples of 16, and so, always, are rows_per_split and the output strides (whole BLOCK_N
    blocks): the JIT marks them divisible, so the AOT build does."""
    specs = []
    for dtype in ("fp16", "bf16", "fp32"):
        for Q, k in ((1, 64), (64, 64), (1, 1024), (64, 1024)):
            block_q, block_n, block_d, kpad, num_warps, num_stages = _config(Q, k, dtype == "fp32", interpret=False)
            path = "registers" if kpad <= REGISTER_KPAD_MAX else "segments"
            name = f"topk_similarity[{dtype},BLOCK_Q={block_q},k<={kpad},{path}]"
            if any(spec.name == name for spec in specs):
                continue  # fp32 takes the same blocks for Q <= 16 as for Q > 16
            specs.append(
                AotSpec(
                    name,
                    _topk_similarity_kernel,
                    {"q_ptr": dtype, "x_ptr": dtype, "out_ptr": "i64"},
                    {
                        "BLOCK_Q": block_q,
                        "BLOCK_N": block_n,
                        "BLOCK_D": block_d,
                        "KPAD": kpad,
                        "DOT_FP32": False,
                        "INPUT_PRECISION": "ieee" if dtype == "fp32" else "tf32",
                    },
                    num_warps=num_warps,
                    num_stages=num_stages,
                    maxnreg=MAXNREG,
                    aligned_args=("D", "stride_qm", "stride_xn", "stride_os", "stride_oq", "rows_per_split"),
                )
            )
    return specs
