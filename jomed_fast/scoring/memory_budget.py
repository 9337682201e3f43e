"""How many rows a forward may take: a byte budget divided by the bytes one row needs.

A *row* is one sequence the decoder runs: a prefix (prefix stage) or one candidate's suffix with its
class-trie nodes (suffix stage). For a row of ``q`` new tokens attending to ``kv = past + q`` keys,
with the reader's L layers, hidden H, MLP width I, heads h / KV heads g of size d, element size e:

=====================  ==============================================================
KV cache               L · 2 · g · d · kv · e   (the prefix part is the copy the row's cache holds)
layer activations      q · (4H + 2·h·d + 2·g·d + 3I) · e   (one layer's live tensors, inference)
attention scores       h · q · kv · (e + 4)     (scores in the compute dtype + fp32 softmax)
embeddings / hidden    2 · q · H · e
=====================  ==============================================================

With autograd on, every layer keeps its activations for the backward pass: the activation and
score terms are counted L times. These are estimates for sizing chunks (on CUDA the caching
allocator and kernels' workspaces add some): the budget should leave headroom, and the default
takes a fraction of what is free.

Default budget: on CUDA 50 % of the free device memory (``torch.cuda.mem_get_info``) at the time
of the call; on CPU 25 % of the available RAM, clamped to [256 MiB, 8 GiB].

Length-aware chunking (``plan_chunks``)
---------------------------------------
The suffix stage runs R rows of lengths ``n_r`` (suffix tokens plus the class trie's N nodes); a
chunk's rows are right-padded to the chunk's own longest row, so a chunk ``c`` of ``R_c`` rows
computes ``slots(c) = R_c · max_{r ∈ c} n_r`` token slots. Cost model of a plan (a partition of the
rows into forwards), in token slots:

    cost(plan) = Σ_c slots(c) + F · (number of forwards),

with F the fixed cost of one forward. Subject to the budget: a chunk padded to length ``ℓ`` holds at
most ``m(ℓ) = rows(budget, ℓ, past)`` rows (``row_bytes`` grows with ℓ, so short chunks may hold
more rows than long ones).

Rows are sorted by length (ties: original order), ``ℓ_1 ≤ … ≤ ℓ_R``. Some optimal plan is made of
contiguous runs of the sorted rows, one forward each (exchange argument: swapping a longer row of a
shorter-padded chunk with a shorter row of a longer-padded one never raises any chunk's max, so
neither its slots nor its budget). A dynamic programme over the sorted positions finds the
cheapest plan, the run ``i+1 … j`` being one forward padded to ``ℓ_j``:

    best(0) = 0,
    best(j) = min_{max(0, j − m(ℓ_j)) ≤ i < j}  best(i) + (j − i) · ℓ_j + F,

in O(R · min(R, m)) (vectorised over i). Ties go to fewer forwards, then to the longer last run.
Equal lengths give the fewest forwards the budget allows; F = ∞ the fewest forwards, padding
minimised among those; F = 0 no padding at all (one forward per distinct length, or more where
the budget forces).

The forward overhead F (``RowCost.forward_overhead``), in token slots, from the same byte model as
the budget: every forward streams each layer's weights once, ``W = (H·(q + 2g) + q·H + 3·H·I) · e``
per layer (q = heads·d, g = kv_heads·d), whatever its rows, while one token slot moves its
activations, ``A = (4H + 2q + 2g + 3I) · e`` per layer (the ``layer activations`` line above). So
``F = W / A`` slots (≈ 734 for the ``small`` reader, ≈ 2 940 for Qwen2-VL 7B): an extra forward must
save at least the slots whose traffic equals one more pass over the weights. It is an upper bound
on a forward's fixed cost wherever its matmuls are compute-bound (there the weight reads overlap
with compute and only the launch/dispatch cost remains), so the plan errs on the side of fewer,
larger forwards. Pass ``forward_overhead=`` to the scorer to override it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .._checks import check_int, is_number

MIN_CPU_BUDGET = 256 << 20
MAX_CPU_BUDGET = 8 << 30


def default_budget(device: torch.device) -> int:
    """Bytes the scorer may use for one chunk's activations (see the module docstring)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return max(int(free * 0.5), 64 << 20)
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        avail = 4 << 30
    return int(min(max(avail // 4, MIN_CPU_BUDGET), MAX_CPU_BUDGET))


def check_budget(memory_budget) -> int | None:
    return check_int(
        "memory_budget", memory_budget, 1, optional=True, expected="None or a positive number of bytes (int)"
    )


class RowCost:
    """The reader's dimensions, and the bytes of one row (see the module docstring)."""

    def __init__(self, reader):
        text = reader.config.get_text_config()
        self.layers = reader.num_layers
        self.hidden = reader.hidden_size
        self.intermediate = int(getattr(text, "intermediate_size", 4 * self.hidden))
        self.heads = reader.num_heads
        self.kv_heads = reader.num_kv_heads
        self.head_dim = reader.head_dim
        self.elem = torch.empty((), dtype=reader.compute_dtype).element_size()

    def row_bytes(self, new_tokens: int, past: int, grad: bool = False) -> int:
        q, kv, e = max(new_tokens, 1), past + max(new_tokens, 1), self.elem
        kv_cache = self.layers * 2 * self.kv_heads * self.head_dim * kv * e
        layer = (
            q
            * (
                4 * self.hidden
                + 2 * self.heads * self.head_dim
                + 2 * self.kv_heads * self.head_dim
                + 3 * self.intermediate
            )
            * e
        )
        scores = self.heads * q * kv * (e + 4)
        io = 2 * q * self.hidden * e
        if grad:
            layer, scores = layer * self.layers, scores * self.layers
        return int(kv_cache + layer + scores + io)

    def forward_overhead(self) -> float:
        """The fixed cost of one forward in token slots: one pass over a layer's weights in bytes
        over one token slot's activation bytes per layer (see the module docstring)."""
        q, g, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        weights = h * (q + 2 * g) + q * h + 3 * h * i
        activations = 4 * h + 2 * q + 2 * g + 3 * i
        return weights / activations

    def rows(self, budget: int, new_tokens: int, past: int, grad: bool = False) -> int:
        """Rows per forward within ``budget`` (at least 1)."""
        return max(1, budget // self.row_bytes(new_tokens, past, grad))

    def vision_patches(self, budget: int, vision_hidden: int, vision_intermediate: int, vision_heads: int) -> int:
        """Patches per vision-tower call within ``budget``: per patch, one layer's activations
        plus its attention row over the chunk (bounded by assuming the chunk is one image)."""
        e = self.elem
        per_patch = (4 * vision_hidden + 3 * vision_intermediate) * e
        # attention: heads * n * n * (e + 4) <= budget / 2  ->  n <= sqrt(budget / (2 heads (e + 4)))
        by_scores = int((budget / (2 * vision_heads * (e + 4))) ** 0.5)
        return max(1, min(budget // (2 * per_patch), by_scores))


def check_overhead(forward_overhead) -> float | None:
    if forward_overhead is None:
        return None
    if not (is_number(forward_overhead) and forward_overhead >= 0):
        raise ValueError(
            f"forward_overhead: expected None or a number of token slots >= 0 (float('inf') allowed), "
            f"got {forward_overhead!r}"
        )
    return float(forward_overhead)


def plan_chunks(lengths: Sequence[int], max_rows: Callable[[int], int], overhead: float) -> list[list[int]]:
    """The cheapest split of R rows into forwards (see the module docstring).

    Args:
        lengths: R row lengths ≥ 1 (the token slots a row needs unpadded).
        max_rows: rows a chunk padded to length ℓ may hold (≥ 1, non-increasing in ℓ).
        overhead: F, a forward's fixed cost in token slots (≥ 0; ``inf``: fewest forwards).

    Returns:
        the chunks, in run order, each a list of row indices sorted by length (ties: index order);
        every row appears once, and ``len(chunk) <= max_rows(max length in chunk)``.
    """
    R = len(lengths)
    if R == 0:
        return []
    for n in lengths:
        if int(n) < 1:
            raise ValueError(f"lengths: expected every row length >= 1, got {int(n)}")
    order = sorted(range(R), key=lambda r: (int(lengths[r]), r))
    ell = np.array([int(lengths[r]) for r in order], dtype=np.float64)
    inf = math.isinf(overhead)
    # per prefix j: (primary, secondary) compared lexicographically: (slots + F·forwards, forwards),
    # or with F = inf (forwards, slots)
    first = np.zeros(R + 1)
    second = np.zeros(R + 1)
    prev = np.zeros(R + 1, dtype=np.int64)
    cache: dict[int, int] = {}
    for j in range(1, R + 1):
        n = int(ell[j - 1])
        if n not in cache:
            cache[n] = max(1, int(max_rows(n)))
        i = np.arange(max(0, j - cache[n]), j)
        slots = (j - i) * ell[j - 1]
        if inf:
            p, q = first[i] + 1, second[i] + slots
        else:
            p, q = first[i] + slots + overhead, second[i] + 1
        cand = np.flatnonzero(p == p.min())
        cand = cand[q[cand] == q[cand].min()]
        k = int(cand[0])  # the smallest i: the longest last run
        first[j], second[j], prev[j] = p[k], q[k], i[k]
    runs = []
    j = R
    while j > 0:
        runs.append(order[int(prev[j]) : j])
        j = int(prev[j])
    return runs[::-1]
