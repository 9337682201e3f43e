"""What a GPU-check step is: the tensors it allocates (:class:`Alloc`), its shapes, repeats and cost
(:class:`Step`), the sizes the check runs at (:class:`Shapes`), and the constants every step shares
(tolerances, the CUDA context, the time limit, the allowances the roofline does not model)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from bench._gpu_check_devices import Device, floor_seconds

GB = 10**9
MiB = 1 << 20
# The CUDA context lives outside torch's allocator (the memory planner's figure, jomed_fast.memory.plan).
CUDA_CONTEXT_BYTES = 500 * MiB
TIME_LIMIT_S = 8 * 60  # the whole check must finish within this on one GPU

DTYPES = ("float32", "float16", "bfloat16")
# rows of a random index drawn (fp32) and normalised at a time on the GPU
DRAW_CHUNK = 65_536
ELEMENT_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "uint8": 1}
# The CPU tests' tolerances (atol, rtol) against float64 (tests/conftest.py; a test pins them equal),
# and tests/test_topk_similarity.py's for scores, whose accumulation order alone differs.
TOLERANCES = {"float32": (2e-5, 2e-5), "float16": (2e-3, 2e-3), "bfloat16": (1.6e-2, 1.6e-2)}
TOPK_SCORE_TOLERANCE = (1e-3, 1e-5)

# Allowances the roofline does not model (seconds; estimates, stated in the plan).
JIT_ALLOWANCE_S = 3.0  # Triton compiles a kernel configuration on its first launch
# The CPU exact search (ops.topk_similarity's chunked fp32 path) measured on the 2-core development
# machine: Q = 64 queries over N = 200k rows in 0.6 s (jomed_fast/ops/topk_similarity.py).
CPU_SEARCH_S_PER_QUERY_ROW = 0.6 / (64 * 200_000)
FUSION_ALLOWANCE_S = 150.0  # building the small reader once, then its K = 4 and K = 50 runs
PLANNER_ALLOWANCE_S = 30.0  # loading the small reader in NF4 and one step


@dataclass(frozen=True)
class Alloc:
    """A tensor a step holds at its peak: ``name``, ``shape``, ``dtype`` (a key of ELEMENT_BYTES)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ELEMENT_BYTES[self.dtype]


@dataclass
class Step:
    """One step of the check. ``kind``: correctness | speed | index_search | fusion | memory_planner.

    ``dims``: the shape letters it runs at; ``allocs``: what it holds on the GPU at its peak (or a
    single row the memory planner predicts); ``calls``: calls it makes (warm-up included) of a body
    that moves ``moved_bytes`` and does ``flops`` (both sides of a comparison: the op and its
    baseline); ``allowance_s``: time the roofline does not model."""

    name: str
    kind: str
    op: str
    dtype: str
    dims: dict[str, int]
    allocs: list[Alloc]
    repeats: int = 1
    calls: int = 1
    moved_bytes: int = 0
    flops: int = 0
    baseline: str = ""
    baseline_moved_bytes: int = 0
    baseline_flops: int = 0
    allowance_s: float = 0.0
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def alloc_bytes(self) -> int:
        return sum(a.nbytes for a in self.allocs)

    def estimated_seconds(self, device: Device) -> float:
        per_call = floor_seconds(self.moved_bytes, self.flops, device)
        per_call += floor_seconds(self.baseline_moved_bytes, self.baseline_flops, device)
        return self.calls * per_call + self.allowance_s

    def describe(self, device: Device, budget_bytes: int) -> dict:
        """The plan row: everything above, the bytes against the budget and the estimate."""
        return {
            "name": self.name,
            "kind": self.kind,
            "op": self.op,
            "dtype": self.dtype,
            "dims": dict(self.dims),
            "allocations": [
                {"name": a.name, "shape": list(a.shape), "dtype": a.dtype, "bytes": a.nbytes} for a in self.allocs
            ],
            "alloc_bytes": self.alloc_bytes,
            "budget_bytes": budget_bytes,
            "fits": self.alloc_bytes <= budget_bytes,
            "repeats": self.repeats,
            "calls": self.calls,
            "moved_bytes": self.moved_bytes,
            "flops": self.flops,
            "baseline": self.baseline,
            "baseline_moved_bytes": self.baseline_moved_bytes,
            "baseline_flops": self.baseline_flops,
            "estimated_s": self.estimated_seconds(device),
            "note": self.note,
            **self.extra,
        }


@dataclass(frozen=True)
class Shapes:
    """The sizes the check runs at (defaults: the paper's; the tests shrink them to run on a CPU).

    H, V: the reader's hidden size and vocabulary; classes: the task sizes checked; K: candidates per
    query; B: queries per step (the head sees B * K rows); kl_rows, fuse_rows: queries per loss /
    fusion call; D, N: the index width and rows; Q: queries per top-k speed call (Q_check for its
    correctness, whose float64 reference holds Q_check x N scores); k: results per query;
    search_N: the rows of the index searched through ``jomed_fast.index`` on the GPU and on the CPU;
    tokens: tokens of the memory planner's steps."""

    H: int = 3584
    V: int = 152064
    classes: tuple[int, ...] = (2, 15)
    K: int = 50
    B: int = 4
    kl_rows: int = 256
    fuse_rows: int = 1024
    fuse_K: int = 4  # inference fuses k_T + k_I = 4 candidates
    D: int = 768
    N: int = 2_108_000  # the paper's index: PMC-OA + ROCO + MIMIC-CXR (jomed_fast.index.PAPER_INDEX)
    Q: int = 64
    Q_check: int = 16
    k: int = 50
    search_N: int = 200_000
    tokens: int = 8192
    # rows of the float64 index chunk the top-k reference scores at a time
    ref_chunk: int = 65_536
    speed_repeats: int = 20
    cpu_repeats: int = 3

    def replace(self, **kw) -> Shapes:
        return dataclasses.replace(self, **kw)
