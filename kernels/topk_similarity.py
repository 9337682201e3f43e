r"""Exact inner-product top-k search, streaming the index once per query block.

Given queries ``q`` ``[Q, D]`` and an index ``x`` ``[N, D]`` (fp16 / bf16 / fp32; queries are cast to
the index dtype), for every query ``i`` return the k largest scores and their row ids

.. math::

    s_{i,n} = \sum_d q_{i,d}\, x_{n,d} \quad (\text{fp32 accumulation}), \qquad
    (\text{scores}_i, \text{ids}_i) = \operatorname{top\text{-}k}_n\, s_{i,n},

sorted by score descending, ties broken by the lower id first. The ``[Q, N]`` score matrix is never
written to memory: each program owns ``BLOCK_Q`` queries and a contiguous split of the index rows;
it computes ``[BLOCK_Q, BLOCK_N]`` tiles of scores with ``tl.dot`` over ``BLOCK_D`` slices of D and
merges each tile into a running top-k kept on chip. Bytes moved: the index once per query block
(``ceil(Q / BLOCK_Q) * N * D * elem``, BLOCK_Q = 16 for Q <= 16, 64 above; the query blocks of a
split are neighbours on the grid's fastest axis, so above Q = 64 their re-reads may be L2 hits),
plus the sampling pass's ``splits * SAMPLE_TILES * BLOCK_N`` rows (1.6% at the paper's shapes),
plus ``2 * splits * Q * KPAD * 8`` of candidates.

**Sortable keys.** A (score, id) pair is packed into one int64 so that one integer comparison orders
by score descending, then id ascending, and every key is distinct:

    high 32 bits: the float32 score's bits, negatives' magnitude bits inverted (monotone in the score)
    low  32 bits: 0xFFFFFFFF - id                                           (lower id = larger key)

``-0.0`` is canonicalised to ``+0.0`` (torch orders them as equal), and NaN (of either sign) to
the largest key, so a NaN score ranks first, as ``torch.topk`` / ``torch.sort`` rank it; ``-inf``
ranks below every number. Rows past N (and queries past Q) get ``KEY_MIN``, below every real key,
so they never enter a top-k (k <= N).

**Streaming.** On the register path one flat loop runs over (tile, D step) with
``tl.range(num_stages=...)``, so the pipeline keeps the next slices of the index in flight across
tile boundaries (a D loop nested in a tile loop drains at every tile); the tile's merge sits in the
branch of its last D step. The compiled Q <= 16 program (4 warps, BLOCK_D 128, 3 stages) waits with
``DEPBAR.LE SB0, 0x2``: the next stage's 16 KB of index stays pending while a slice is multiplied,
and two programs fit an SM (182-185 registers). The Q > 16 program (16 warps, BLOCK_D 64, 4 stages,
``maxnreg`` 128) keeps two or three 8 KB slices in flight, one program per SM. The query slices are
re-read per step (from L1 / L2: 24 KB for 16 queries of 768 fp16): Triton cannot index a register
tensor by a runtime D step, so a resident ``[BLOCK_Q, D]`` block would need D as a constexpr.

**Merging a tile** (two code paths, chosen by the constexpr ``KPAD``):

* ``KPAD <= BLOCK_N`` (k <= 64, the retrieval case): the running list ``top`` ``[BLOCK_Q, KPAD]``
  (descending) lives in registers. When at most one key per query beats its k-th (``thr``), that
  key is the query's tile maximum: it replaces the list's last entry, which leaves a descending then
  ascending (bitonic) row, sorted in log2 KPAD rounds. Otherwise the tile's top KPAD are selected
  *ascending* (bitonic top-k); ``max(top, tile_top)`` of a descending and an ascending run is a
  bitonic run holding the top KPAD of the union (Batcher's half-cleaner), and log2 KPAD
  compare-exchange rounds sort it again.
* ``KPAD > BLOCK_N`` (k > 64): a list of up to 1024 int64 per query does not fit in registers next
  to the tile, so it lives in this program's slice of the output buffer, as ``ceil(k / BLOCK_N)``
  sorted segments of ``BLOCK_N``. The tile (sorted ascending; or its maximum alone when one key per
  query beats its k-th) is a "carry" merged through the segments in order: segment ``j`` keeps
  ``max(seg_j, carry)`` (the top half of their union), the carry keeps ``min`` (the bottom half),
  each bitonic and re-sorted. After the last segment the list is the top of the union. A segment
  whose smallest key beats the carry's largest in every row is left as it is. The segment loop
  keeps the compiler from pipelining a flat loop, so this path pipelines each tile's D loop alone.

A tile with no key above any query's ``thr`` costs one count. ``thr`` never drops below the query's
*floor*: the launcher first searches the first ``SAMPLE_TILES`` tiles of every split (when splits
are at least ``SAMPLE_MIN_TILES`` long) and merges them; their k-th key is below the query's k-th
over the whole index, so a key under it cannot be in the answer, and every program of the full pass
filters as if it had read the whole sample. For i.i.d. scores, at the paper's shapes (8k rows per
split at Q <= 16 on an H200), this takes the tiles merged per program from 61% (33% full merges) to
8% (0.5% full) at Q = 1, and the full merges from 92% to 6% at Q = 16 (``simulate_merges`` in
``tests/test_topk_similarity.py``; ``docs/benchmarks.md`` has the whole table). Entries past k in a
list may be stale, and entries under the floor may be missing; the first k are exact wherever they
are above the floor, which is all the merge needs.

**Splits and their merge.** The launcher cuts the index into one split per program slot left by the
query blocks (``programs_per_sm`` x SMs, a single wave: 264 splits of 8k rows for Q <= 16 on an
H200), at least ``MIN_SPLIT_TILES`` tiles each. ``_merge_splits_kernel`` (one program per query)
reads the splits' sorted lists, even ones back to front, so a block of lists is a row of alternately
ascending and descending runs whose neighbours merge by elementwise max and log2 KPAD rounds, no
sort of their own; it decodes the top k into scores and ids and writes the floor. Two launches per
pass (and one pass more with the sample) replace a copy, ``torch.topk`` and the decoding kernels.

**Cost model (predictions, unmeasured).** Per SM at the roofline a 96 KB tile (64 rows x 768 fp16)
takes 2.6 µs on an H200 and 15.8 µs on an L40; Little's law asks ~25 KB / ~4 KB in flight per SM.
The Q <= 16 programs hold 32-64 KB per SM, the Q > 16 program 16-24 KB. With the simulated merge
rates and an estimated ~80 instructions per thread per compare-exchange round (full merge ~39
rounds, single insert ~24, skip ~6), the predicted fractions of the roofline are H200 ~0.93 / ~0.85
/ ~0.30 and L40 ~0.95 / ~0.95 / ~0.90 at Q = 1 / 16 / 64. The H200 at Q = 64 misses the 70% target:
65% of its tiles still merge fully, and a single 16-warp program per SM has no second program to
stream while it merges (``docs/benchmarks.md`` derives each figure).

The sorting networks are triton.language.standard's bitonic ones with one change: the partner of
an element in a compare-exchange round is found with a sum (``a + b - a``, exact in wrapping int64)
rather than ``xor_sum``, which the interpreter reduces element by element in Python. fp32 indexes
use ``input_precision="ieee"`` (no TF32), so fp32 scores are fp32-exact sums.

Layout: kernels -> launcher -> ``aot_specs()``; the contract (shapes, dtypes, ties, NaN, errors), the
torch reference and the CPU path live in ``jomed_fast/ops/topk_similarity.py``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

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
# Keys one split-merge step holds per program (16 KB of int64), and its warps.
MERGE_KEYS = 2048
MERGE_WARPS = 8
# Its register limit: without one, Triton 3.7's ptxas holds the KPAD = 64 merge at 64 registers on
# sm_89 (four programs per SM) and spills 8 bytes.
MERGE_MAXNREG = 128
# Shortest split, in tiles: a shorter one spends most of its tiles merging (its k-th is still low).
MIN_SPLIT_TILES = 8
# The sampling pass: the first SAMPLE_TILES tiles of each split, run when splits are at least
# SAMPLE_MIN_TILES tiles long (so it adds at most 1/8 to the rows read; 1.6% at the paper's shapes).
SAMPLE_TILES = 2
SAMPLE_MIN_TILES = 16


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
def _merge_runs(h, log_n: tl.constexpr, log_k: tl.constexpr, DESCENDING: tl.constexpr):
    """The top 2**log_k of each row of the hypercube ``h`` (rows of 2**log_n, log_n > log_k) whose
    runs of 2**log_k are sorted alternately ascending (even runs) and descending (odd runs): keep the
    elementwise max of neighbouring runs (a bitonic run holding the top of both) and re-sort it."""
    for i in tl.static_range(log_k + 1, log_n + 1):
        h = tl.max(h, axis=_log2(h.numel) - 1 - log_k)
        h = _bitonic_rounds(h, log_k, 2 if i < log_n else DESCENDING)
    return h


@triton.jit
def _top_keys(x, K: tl.constexpr, DESCENDING: tl.constexpr):
    """The K largest keys of each row of ``x`` [R, L] (K <= L), sorted in the given order.

    Bitonic top-k: sort runs of K alternately up and down, then merge neighbouring runs
    (``_merge_runs``). K = L is a sort.
    """
    log_n: tl.constexpr = _log2(x.shape[1])
    log_k: tl.constexpr = _log2(K)
    h = tl.reshape(x, [2] * _log2(x.numel))
    for i in tl.static_range(1, log_k + 1):
        h = _bitonic_rounds(h, i, 2 if i < log_n else DESCENDING)
    h = _merge_runs(h, log_n, log_k, DESCENDING)
    return tl.reshape(h, [x.shape[0], K])


@triton.jit
def _bitonic_sort_rows(x, DESCENDING: tl.constexpr):
    """Sort each row of ``x`` [R, L] whose rows are bitonic (log2 L compare-exchange rounds)."""
    h = tl.reshape(x, [2] * _log2(x.numel))
    h = _bitonic_rounds(h, _log2(x.shape[1]), DESCENDING)
    return tl.reshape(h, x.shape)


@triton.jit
def _encode(acc, rows_n, row_ok):
    """Sortable int64 keys of a fp32 score tile ``acc`` [BLOCK_Q, BLOCK_N] of index rows ``rows_n``;
    entries outside ``row_ok`` (rows past the split's end, queries past Q) get ``KEY_MIN``."""
    # Equal scores need equal high words, so -0.0 becomes +0.0 (-0.0 + 0.0 = +0.0). A sum of -0.0
    # products is -0.0 when the compiler drops the zero accumulator of the first dot (Hopper wgmma
    # with the accumulator disabled); the interpreter always adds it, so no test reaches this line.
    s = acc + 0.0
    bits = s.to(tl.int32, bitcast=True)
    high = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # order-preserving as a signed int
    high = tl.where(s != s, 0x7FFFFFFF, high)  # NaN ranks first, as in torch.topk
    key = (high.to(tl.int64) << 32) | (4294967295 - rows_n.to(tl.int64))[None, :]
    return tl.where(row_ok, key, KEY_MIN)


@triton.jit
def _decode(key):
    """int64 keys -> (float32 scores, int64 ids); the inverse of ``_encode``."""
    high = (key >> 32).to(tl.int32)
    bits = high ^ ((high >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), 4294967295 - (key & 4294967295)


@triton.jit
def _dot_slice(
    q_rows,
    x_ptr,
    rows_n,
    q_ok,
    n_ok,
    d0,
    D,
    stride_xn,
    acc,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """``acc + q[:, d0:d0+BLOCK_D] . x[rows_n, d0:d0+BLOCK_D]^T`` ([BLOCK_Q, BLOCK_N], fp32); masked
    rows and columns read 0."""
    cols_d = d0 + tl.arange(0, BLOCK_D)
    d_ok = cols_d < D
    q = tl.load(q_rows + cols_d[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0)
    # int64 offsets: N * D passes 2**31 for a few million 768-d rows.
    x = tl.load(
        x_ptr + rows_n.to(tl.int64)[:, None] * stride_xn + cols_d[None, :],
        mask=n_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if DOT_FP32:  # the interpreter computes bf16 tl.dot wrongly; fp32 products of bf16 values are exact
        q = q.to(tl.float32)
        x = x.to(tl.float32)
    return tl.dot(q, tl.trans(x), acc, input_precision=INPUT_PRECISION)


@triton.jit
def _topk_similarity_kernel(
    q_ptr,
    x_ptr,
    out_ptr,
    floor_ptr,
    Q,
    N,
    D,
    k,
    rows_per_split,
    rows_scanned,
    stride_qm,
    stride_xn,
    stride_os,
    stride_oq,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    KPAD: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """out ``[splits, Q, >= KPAD]`` int64: the split's keys, descending; its first k are exact
    wherever they are above ``floor[q]`` (a key known to be below the query's k-th over the whole
    index). Each split reads its first ``rows_scanned`` rows."""
    pid_q = tl.program_id(0)
    split = tl.program_id(1)
    rows_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = rows_q < Q
    n_start = split * rows_per_split
    n_end = tl.minimum(N, n_start + rows_scanned)
    out_rows = out_ptr + split.to(tl.int64) * stride_os + rows_q.to(tl.int64)[:, None] * stride_oq
    # Each query's current k-th key, never below its floor: a key under the floor is not in the
    # index's top k, whatever this split holds.
    floor = tl.load(floor_ptr + rows_q, mask=q_ok, other=KEY_MIN)
    thr = floor
    q_rows = q_ptr + rows_q.to(tl.int64)[:, None] * stride_qm

    if KPAD <= BLOCK_N:
        cols = tl.arange(0, KPAD)
        top = tl.full((BLOCK_Q, KPAD), KEY_MIN, tl.int64)
        d_steps = tl.cdiv(D, BLOCK_D)
        n_tiles = tl.cdiv(n_end - n_start, BLOCK_N)
        # One flat loop over (tile, D step), so the software pipeline keeps NUM_STAGES - 1 slices of
        # the index in flight across tile boundaries too (a loop over D inside a loop over tiles
        # drains the pipeline at every tile). The tile's merge sits in the branch of its last D step.
        acc = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
        for step in tl.range(0, n_tiles * d_steps, num_stages=NUM_STAGES):
            tile = step // d_steps
            d0 = (step - tile * d_steps) * BLOCK_D
            rows_n = n_start + tile * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = rows_n < n_end
            acc = _dot_slice(
                q_rows, x_ptr, rows_n, q_ok, n_ok, d0, D, stride_xn, acc, BLOCK_D, DOT_FP32, INPUT_PRECISION
            )
            if d0 + BLOCK_D >= D:
                keys = _encode(acc, rows_n, q_ok[:, None] & n_ok[None, :])
                acc = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
                # Entries that beat their query's k-th: after the first tiles at most one per query
                # (the tile's max), which goes in by one sort of a bitonic row instead of a tile sort.
                most = tl.max(tl.sum((keys > thr[:, None]).to(tl.int32), axis=1))
                if most == 1:
                    # top descending with its last entry raised to the tile's max: descending,
                    # then ascending, so a bitonic row.
                    best = tl.max(keys, axis=1)
                    top = tl.where(cols[None, :] == KPAD - 1, tl.maximum(top, best[:, None]), top)
                    top = _bitonic_sort_rows(top, 1)
                    thr = tl.maximum(tl.min(tl.where(cols[None, :] < k, top, KEY_MAX), axis=1), floor)
                elif most > 1:
                    # top descending, tile's top ascending: their elementwise max is bitonic and
                    # holds the top KPAD of the union.
                    top = _bitonic_sort_rows(tl.maximum(top, _top_keys(keys, KPAD, 0)), 1)
                    thr = tl.maximum(tl.min(tl.where(cols[None, :] < k, top, KEY_MAX), axis=1), floor)
        tl.store(out_rows + cols[None, :], top, mask=q_ok[:, None])
    else:
        cols = tl.arange(0, BLOCK_N)
        n_seg = tl.cdiv(k, BLOCK_N)
        empty = tl.full((BLOCK_Q, BLOCK_N), KEY_MIN, tl.int64)
        for j in range(0, n_seg):
            tl.store(out_rows + j * BLOCK_N + cols[None, :], empty, mask=q_ok[:, None])
        for n0 in range(n_start, n_end, BLOCK_N):
            # The segment loop below keeps the compiler from pipelining a flat loop: the D loop of
            # each tile is pipelined on its own.
            rows_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = rows_n < n_end
            acc = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
            for d0 in tl.range(0, D, BLOCK_D, num_stages=NUM_STAGES):
                acc = _dot_slice(
                    q_rows, x_ptr, rows_n, q_ok, n_ok, d0, D, stride_xn, acc, BLOCK_D, DOT_FP32, INPUT_PRECISION
                )
            keys = _encode(acc, rows_n, q_ok[:, None] & n_ok[None, :])
            most = tl.max(tl.sum((keys > thr[:, None]).to(tl.int32), axis=1))
            if most > 0:
                if most == 1:  # the carry is the tile's max alone, ascending: last
                    carry = tl.where(cols[None, :] == BLOCK_N - 1, tl.max(keys, axis=1)[:, None], KEY_MIN)
                else:
                    carry = _top_keys(keys, BLOCK_N, 0)  # the whole tile, ascending
                new_thr = floor
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


@triton.jit
def _merge_splits_kernel(
    keys_ptr,
    scores_ptr,
    ids_ptr,
    floor_ptr,
    splits,
    k,
    stride_ks,
    stride_kq,
    stride_oq,
    KPAD: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,
):
    """One query per program: the top k of its ``splits`` sorted key lists ``keys[s, q, :k]``,
    decoded into ``scores[q, :k]`` (float32) and ``ids[q, :k]`` (int64); ``floor[q]`` gets the k-th
    key less one (``KEY_MIN`` when there are fewer than k keys): every key that can be in the top k
    of a superset of these rows is above it."""
    q = tl.program_id(0)
    split_in = tl.arange(0, SPLIT_BLOCK)
    cols = tl.arange(0, KPAD)
    # Each list is stored descending; even lists of a block are read back to front (ascending), so
    # the block is the alternating runs _merge_runs takes, and needs no sort of its own. Entries
    # past k (stale or padding) and lists past ``splits`` read as KEY_MIN, which keeps runs sorted.
    pos = tl.where((split_in % 2 == 1)[:, None], cols[None, :], KPAD - 1 - cols[None, :])
    base = keys_ptr + q.to(tl.int64) * stride_kq
    top = tl.full((1, KPAD), KEY_MIN, tl.int64)  # descending
    for s0 in range(0, splits, SPLIT_BLOCK):
        s = s0 + split_in
        block = tl.load(
            base + s.to(tl.int64)[:, None] * stride_ks + pos, mask=(s < splits)[:, None] & (pos < k), other=KEY_MIN
        )
        h = tl.reshape(block, [2] * _log2(SPLIT_BLOCK * KPAD))
        best = tl.reshape(_merge_runs(h, _log2(SPLIT_BLOCK * KPAD), _log2(KPAD), 0), [1, KPAD])  # ascending
        top = _bitonic_sort_rows(tl.maximum(top, best), 1)
    scores, ids = _decode(top)
    out = q.to(tl.int64) * stride_oq + cols[None, :]
    tl.store(scores_ptr + out, scores, mask=cols[None, :] < k)
    tl.store(ids_ptr + out, ids, mask=cols[None, :] < k)
    kth = tl.max(tl.where(cols[None, :] == k - 1, top, KEY_MIN))
    tl.store(floor_ptr + q, tl.maximum(kth, KEY_MIN + 1) - 1)  # keys are distinct: >= kth is > kth - 1


class _Config(NamedTuple):
    """One launch of the search kernel: its blocks, list width, compile options, and how many of its
    programs one SM holds at once (from the compiled registers and shared memory, ``aot_specs``)."""

    block_q: int
    block_n: int
    block_d: int
    kpad: int
    num_warps: int
    num_stages: int
    maxnreg: int
    programs_per_sm: int


def _config(Q: int, k: int, fp32: bool, interpret: bool | None = None) -> _Config:
    """The search kernel's launch for Q queries, top-k, the index dtype (fp32 or a 16-bit one).

    k <= 64 (KPAD 64) keeps the running list in registers; k > 64 takes the segment path, whose
    code does not depend on KPAD (1024 names the bucket, so one compile serves every k).
    16-bit index, k <= 64 (the retrieval case; the kernel docstring derives the bytes in flight):

    * Q <= 16 (one query per sample at inference): 16-query programs of 4 warps, BLOCK_D 128,
      3 stages: 182-185 registers and 42 KB of shared memory, so two programs per SM, each with one
      or two 16 KB index slices in flight.
    * Q > 16: 64-query programs (the index read once per 64 queries) of 16 warps, BLOCK_D 64,
      4 stages: at most 128 registers (``maxnreg``; 16 warps x 128 fill the register file), one
      program per SM with up to three 8 KB index slices in flight. With 8 warps ptxas on sm_89
      moves the sorting network's shuffles into a called subroutine with a stack frame.

    k > 64 takes 16- or 32-query programs of 8 warps, BLOCK_D 64, its D loop pipelined per tile.
    An fp32 index (an ``ieee`` FMA dot, its operands twice as wide) takes BLOCK_D 16 and 2 stages
    (wider slices spill on the segment path). Every shipped config compiles for sm_89 and sm_90 without spills.
    Under the interpreter, whose cost is per program and per op, blocks are as large as the shapes
    allow and there is one stage.
    """
    interpret = interpreter_enabled() if interpret is None else interpret
    kpad = REGISTER_KPAD_MAX if k <= REGISTER_KPAD_MAX else MAX_K  # one compile per path
    registers = kpad <= REGISTER_KPAD_MAX
    if interpret:
        return _Config(min(64, max(16, triton.next_power_of_2(Q))), 256, 128, kpad, 4, 1, MAXNREG, 1)
    if fp32:
        return _Config(64, 64, 16, kpad, 8, 2, MAXNREG, 1) if registers else _Config(32, 64, 16, kpad, 8, 2, MAXNREG, 1)
    small = Q <= 16
    if registers:
        return _Config(16, 64, 128, kpad, 4, 3, MAXNREG, 2) if small else _Config(64, 64, 64, kpad, 16, 4, 128, 1)
    return _Config(16 if small else 32, 64, 64, kpad, 8, 3, MAXNREG, 1)


def _merge_config(k: int) -> tuple[int, int]:
    """(KPAD, SPLIT_BLOCK) of the split merge: lists padded to a power of two (64 for k <= 64, the
    search kernel's bucket), SPLIT_BLOCK lists merged at a time, 2048 keys (16 KB) per step."""
    kpad = max(REGISTER_KPAD_MAX, triton.next_power_of_2(k))
    return kpad, max(2, MERGE_KEYS // kpad)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_rows(Q: int, N: int, block_q: int, block_n: int, programs: int) -> tuple[int, int]:
    """(splits, rows_per_split) of an N-row index: enough splits that the query blocks x splits
    fill ``programs`` (the programs the GPU holds at once) in a single wave, each program streaming
    one long split (so the running top-k's threshold rises far enough for most tiles to skip the
    merge), at least ``MIN_SPLIT_TILES`` tiles per split; whole tiles, so every split starts on a
    tile boundary."""
    tiles = triton.cdiv(N, block_n)
    splits = max(1, min(triton.cdiv(programs, triton.cdiv(Q, block_q)), tiles // MIN_SPLIT_TILES))
    rows_per_split = triton.cdiv(tiles, splits) * block_n
    return triton.cdiv(N, rows_per_split), rows_per_split


def _splits(Q: int, N: int, cfg: _Config, device: torch.device) -> tuple[int, int]:
    """``split_rows`` for the programs the device holds; one split off the GPU (the interpreter)."""
    if device.type != "cuda":
        return 1, triton.cdiv(N, cfg.block_n) * cfg.block_n
    programs = cfg.programs_per_sm * _sm_count(device.index or 0)
    return split_rows(Q, N, cfg.block_q, cfg.block_n, programs)


def _check_rows_contiguous(index: torch.Tensor) -> None:
    """The kernel reads each index row in place (any row stride, unit element stride): a view with
    strided columns is refused rather than copied, since a copy of the paper's index is 3.24 GB."""
    N, D = index.shape
    if D > 1 and index.stride(1) != 1:
        nbytes = N * D * index.element_size()
        raise ValueError(
            f"index: expected rows of contiguous elements (stride(1) == 1), got strides {tuple(index.stride())} "
            f"for shape {tuple(index.shape)}; index.contiguous() would copy {N} x {D} x {index.element_size()} B "
            f"= {nbytes} bytes ({nbytes / 1e9:.2f} GB): make the copy once and search it"
        )


def topk_similarity_forward(queries: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """queries ``[Q, D]``, index ``[N, D]`` -> (float32 scores ``[Q, k]`` descending, int64 ids ``[Q, k]``)."""
    Q, D = queries.shape
    N = index.shape[0]
    _check_rows_contiguous(index)
    scores = torch.empty((Q, k), device=index.device, dtype=torch.float32)
    ids = torch.empty((Q, k), device=index.device, dtype=torch.int64)
    if Q == 0:
        return scores, ids
    q = queries.to(index.dtype)
    if q.stride(1) != 1:
        q = q.contiguous()  # Q x D: small
    cfg = _config(Q, k, index.dtype == torch.float32)
    splits, rows_per_split = _splits(Q, N, cfg, index.device)
    width = cfg.kpad if cfg.kpad <= cfg.block_n else triton.cdiv(k, cfg.block_n) * cfg.block_n
    keys = torch.empty((splits, Q, width), device=index.device, dtype=torch.int64)
    floor = torch.full((Q,), -(2**63), device=index.device, dtype=torch.int64)
    merge_kpad, split_block = _merge_config(k)

    def search(rows_scanned: int) -> None:
        _topk_similarity_kernel[(triton.cdiv(Q, cfg.block_q), splits)](
            q,
            index,
            keys,
            floor,
            Q,
            N,
            D,
            k,
            rows_per_split,
            rows_scanned,
            q.stride(0),
            index.stride(0),
            keys.stride(0),
            keys.stride(1),
            BLOCK_Q=cfg.block_q,
            BLOCK_N=cfg.block_n,
            BLOCK_D=cfg.block_d,
            KPAD=cfg.kpad,
            NUM_STAGES=cfg.num_stages,
            DOT_FP32=interpreter_enabled(),
            INPUT_PRECISION="ieee" if index.dtype == torch.float32 else "tf32",
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            maxnreg=cfg.maxnreg,
        )
        _merge_splits_kernel[(Q,)](
            keys,
            scores,
            ids,
            floor,
            splits,
            k,
            keys.stride(0),
            keys.stride(1),
            scores.stride(0),
            KPAD=merge_kpad,
            SPLIT_BLOCK=split_block,
            num_warps=MERGE_WARPS,
            maxnreg=MERGE_MAXNREG,
        )

    if splits > 1 and rows_per_split >= SAMPLE_MIN_TILES * cfg.block_n:
        # The first SAMPLE_TILES tiles of every split, searched and merged: their k-th key is a
        # floor under each query's k-th over the whole index, so every program of the full pass
        # filters as if it had already read splits x SAMPLE_TILES tiles.
        search(SAMPLE_TILES * cfg.block_n)
    search(rows_per_split)
    return scores, ids


def aot_specs() -> list[AotSpec]:
    """Every configuration the launcher can pick on a GPU: each index dtype x (Q <= 16, Q > 16) x
    (k <= 64 in registers, k > 64 on the segment path, one compile for every KPAD up to 1024), and
    the split merge for each list width (64 for k <= 64, then every power of two up to 1024).
    D (768 in the paper's index; any real embedding width) and the row strides made of it are
    multiples of 16, and so, always, are rows_per_split and the key buffer's strides (whole
    BLOCK_N blocks): the JIT marks them divisible, so the AOT build does."""
    specs = []
    for dtype in ("fp16", "bf16", "fp32"):
        for Q, k in ((1, 64), (64, 64), (1, 1024), (64, 1024)):
            cfg = _config(Q, k, dtype == "fp32", interpret=False)
            path = "registers" if cfg.kpad <= REGISTER_KPAD_MAX else "segments"
            name = f"topk_similarity[{dtype},BLOCK_Q={cfg.block_q},k<={cfg.kpad},{path}]"
            if any(spec.name == name for spec in specs):
                continue  # fp32 takes the same blocks for Q <= 16 as for Q > 16
            specs.append(
                AotSpec(
                    name,
                    _topk_similarity_kernel,
                    {"q_ptr": dtype, "x_ptr": dtype, "out_ptr": "i64", "floor_ptr": "i64"},
                    {
                        "BLOCK_Q": cfg.block_q,
                        "BLOCK_N": cfg.block_n,
                        "BLOCK_D": cfg.block_d,
                        "KPAD": cfg.kpad,
                        "NUM_STAGES": cfg.num_stages,
                        "DOT_FP32": False,
                        "INPUT_PRECISION": "ieee" if dtype == "fp32" else "tf32",
                    },
                    num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages,
                    maxnreg=cfg.maxnreg,
                    # the 16-bit index (the project's storage) streams at or above the Little's-law
                    # need on both targets on the retrieval path (k <= 64); the segment path (k > 64)
                    # keeps 0.8 of it on sm_90 under Triton 3.7 (one CTA per SM); an fp32 index holds
                    # two stages of twice the bytes per row in the same registers, about a quarter
                    # of the need on sm_90 (a precision option)
                    in_flight_floor=0.2 if dtype == "fp32" else 0.9 if path == "registers" else 0.75,
                    aligned_args=(
                        "D",
                        "stride_qm",
                        "stride_xn",
                        "stride_os",
                        "stride_oq",
                        "rows_per_split",
                        "rows_scanned",
                    ),
                )
            )
    for k in (64, 128, 256, 512, 1024):
        kpad, split_block = _merge_config(k)
        specs.append(
            AotSpec(
                f"topk_similarity_merge[KPAD={kpad},SPLIT_BLOCK={split_block}]",
                _merge_splits_kernel,
                {"keys_ptr": "i64", "scores_ptr": "fp32", "ids_ptr": "i64", "floor_ptr": "i64"},
                {"KPAD": kpad, "SPLIT_BLOCK": split_block},
                num_warps=MERGE_WARPS,
                num_stages=1,
                maxnreg=MERGE_MAXNREG,
                aligned_args=("stride_ks", "stride_kq"),
            )
        )
    return specs
