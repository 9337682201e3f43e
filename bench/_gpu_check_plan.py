"""The GPU check's plan: every step's shapes, dtypes and allocations, the device table and the
roofline model. Pure arithmetic: nothing here touches a GPU, so the dry run (and CI) plans and
checks exactly what the CUDA run executes.

* :class:`Device`, :data:`DEVICES`, :func:`lookup_device`: peak DRAM bandwidth and dense fp16
  tensor-core FLOP/s of the GPUs the check knows, found from ``torch.cuda.get_device_name()``.
* Roofline: a call that moves ``b`` bytes and does ``f`` FLOPs takes at least
  ``t_floor = max(b / bandwidth, f / flops)``; a measured time ``t`` reaches the fraction
  ``b / t / bandwidth`` of the memory-bandwidth roofline (:func:`bandwidth_fraction`).
* :class:`Shapes`: the paper's sizes (Qwen2-VL 7B head H = 3584, V = 152064; C in {2, 15}; K = 50;
  an index of N = 2.108M rows of D = 768). :func:`plan_steps` turns them into :class:`Step` rows,
  each with the tensors it allocates (bytes against the device budget), its repeats and an
  estimated duration (the roofline floor of every call, plus a stated allowance for what the
  roofline does not model: Triton's first-launch compilation, model loading, the CPU path).
* :func:`check_budget`: the first step that does not fit ``memory_gb`` (after the CUDA context).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

GB = 10**9
MiB = 1 << 20
# The CUDA context lives outside torch's allocator (the memory planner's figure, jomed_fast.memory.plan).
CUDA_CONTEXT_BYTES = 500 * MiB
TIME_LIMIT_S = 8 * 60  # the whole check must finish within this on one GPU

DTYPES = ("float32", "float16", "bfloat16")
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


# ---------------------------------------------------------------------------------------------
# Devices and the roofline
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Device:
    """A GPU's peaks: DRAM ``bandwidth`` in bytes/s, dense fp16 tensor-core ``flops`` per s, ``memory`` bytes."""

    name: str
    bandwidth: float
    flops: float
    memory: float


DEVICES = {
    d.name: d
    for d in (
        Device("L40", 864e9, 181e12, 48e9),
        Device("L40S", 864e9, 362e12, 48e9),
        Device("H100 SXM", 3350e9, 989e12, 80e9),
        Device("H100 PCIe", 2000e9, 756e12, 80e9),
        Device("H200", 4800e9, 989e12, 141e9),
        Device("A100 80GB", 2039e9, 312e12, 80e9),
        Device("RTX 4090", 1008e9, 165e12, 24e9),
    )
}
# (words all present, words none present) in the upper-cased CUDA name -> table entry; first match wins.
# "NVIDIA H100 80GB HBM3" is the SXM part; the NVL and 40 GB A100 have other peaks, so they are unknown.
_NAME_RULES = (
    (("L40S",), (), "L40S"),
    (("L40",), (), "L40"),
    (("H200",), (), "H200"),
    (("H100", "PCIE"), (), "H100 PCIe"),
    (("H100",), ("NVL", "PCIE"), "H100 SXM"),
    (("A100", "80GB"), (), "A100 80GB"),
    (("4090",), (), "RTX 4090"),
)


def lookup_device(cuda_name: str) -> Device | None:
    """The table's entry for a ``torch.cuda.get_device_name()`` string, or None for a GPU it does not hold."""
    words = set(re.split(r"[\s_-]+", cuda_name.upper()))
    for present, absent, name in _NAME_RULES:
        if all(w in words for w in present) and not any(w in words for w in absent):
            return DEVICES[name]
    return None


def device_slug(cuda_name: str) -> str:
    """A file name for a device: ``"NVIDIA H100 80GB HBM3"`` -> ``"h100-80gb-hbm3"``."""
    slug = re.sub(r"[^a-z0-9]+", "-", cuda_name.lower()).strip("-")
    slug = re.sub(r"^nvidia-", "", slug)
    if not slug:
        raise ValueError(f"cuda_name: expected a device name with letters or digits, got {cuda_name!r}")
    return slug


def floor_seconds(nbytes: float, flops: float, device: Device) -> float:
    """The roofline floor of one call: the larger of its memory time and its compute time."""
    return max(nbytes / device.bandwidth, flops / device.flops)


def bandwidth_fraction(nbytes: float, seconds: float, bandwidth: float) -> float:
    """The fraction of the memory-bandwidth roofline a call reached: ``nbytes / seconds / bandwidth``."""
    if not seconds > 0 or not bandwidth > 0:
        raise ValueError(f"seconds, bandwidth: expected both > 0, got {seconds} and {bandwidth}")
    return nbytes / seconds / bandwidth


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------
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
            "allocations": [{"name": a.name, "shape": list(a.shape), "dtype": a.dtype, "bytes": a.nbytes} for a in self.allocs],
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


def _e(dtype: str) -> int:
    return ELEMENT_BYTES[dtype]


def correctness_steps(s: Shapes) -> list[Step]:
    """Every op in fp32 / fp16 / bf16 against its float64 reference, forward and backward."""
    steps = []
    R = s.B * s.K
    for dtype in DTYPES:
        e = _e(dtype)
        for C in s.classes:
            steps.append(
                Step(
                    f"correctness/class_log_softmax/{dtype}/C={C}",
                    "correctness",
                    "class_log_softmax",
                    dtype,
                    {"R": R, "V": s.V, "C": C},
                    [
                        Alloc("logits", (R, s.V), dtype),
                        Alloc("d logits", (R, s.V), dtype),
                        Alloc("d logits off the classes (copy)", (R, s.V), dtype),
                        Alloc("float64 class logits, reference", (R, C), "float64"),
                    ],
                    calls=1,
                    moved_bytes=2 * R * s.V * e,  # backward writes [R, V]; forward reads C columns
                    allowance_s=2 * JIT_ALLOWANCE_S,
                )
            )
            steps.append(
                Step(
                    f"correctness/head_class_log_softmax/{dtype}/C={C}",
                    "correctness",
                    "head_class_log_softmax",
                    dtype,
                    {"N": R, "H": s.H, "V": s.V, "C": C},
                    [
                        Alloc("weight", (s.V, s.H), dtype),
                        Alloc("d weight (dense)", (s.V, s.H), dtype),
                        Alloc("hidden + d hidden", (2 * R, s.H), dtype),
                        Alloc("float64 hidden + class rows + grads, reference", (2 * (R + C), s.H), "float64"),
                    ],
                    calls=1,
                    moved_bytes=2 * s.V * s.H * e,  # the init of weight, the backward's zeroed [V, H]
                    flops=3 * 2 * R * C * s.H,
                    allowance_s=3 * JIT_ALLOWANCE_S,
                )
            )
            steps.append(
                Step(
                    f"correctness/fuse_candidates/{dtype}/C={C}",
                    "correctness",
                    "fuse_candidates",
                    dtype,
                    {"B": s.fuse_rows, "K": s.K, "C": C},
                    [
                        Alloc("log-probs + grad", (2, s.fuse_rows, s.K, C), dtype),
                        Alloc("float64 log-probs + grad, reference", (2, s.fuse_rows, s.K, C), "float64"),
                        Alloc("scores + grads", (4, s.fuse_rows, s.K), "float64"),
                    ],
                    moved_bytes=4 * s.fuse_rows * s.K * C * 8,
                    allowance_s=2 * JIT_ALLOWANCE_S,
                )
            )
        steps.append(
            Step(
                f"correctness/retrieval_kl_loss/{dtype}",
                "correctness",
                "retrieval_kl_loss",
                dtype,
                {"B": s.kl_rows, "K": s.K},
                [Alloc("scores, reader log-likelihoods, grads (+ float64 copies)", (6, s.kl_rows, s.K), "float64")],
                moved_bytes=6 * s.kl_rows * s.K * 8,
                allowance_s=2 * JIT_ALLOWANCE_S,
            )
        )
        steps.append(
            Step(
                f"correctness/topk_similarity/{dtype}",
                "correctness",
                "topk_similarity",
                dtype,
                {"Q": s.Q_check, "N": s.N, "D": s.D, "k": s.k},
                [
                    Alloc("index", (s.N, s.D), dtype),
                    Alloc("float64 index chunk, reference", (min(s.ref_chunk, s.N), s.D), "float64"),
                    Alloc("float64 scores [Q, N], reference", (s.Q_check, s.N), "float64"),
                    Alloc("float64 scores, sorted top k + 1", (s.Q_check, s.N), "float64"),
                ],
                moved_bytes=s.N * s.D * (e + 8) + 2 * s.Q_check * s.N * 8,
                flops=2 * 2 * s.Q_check * s.N * s.D,
                allowance_s=JIT_ALLOWANCE_S,
                note="float64 reference scored chunk by chunk (a float64 copy of the whole index would not fit)",
            )
        )
    return steps


def speed_steps(s: Shapes, faiss_gpu: bool) -> list[Step]:
    """Each kernel against the torch composition it replaces (and faiss-gpu for the top-k).

    Bytes per call (the analytic model of bench/kernels.py): the fused ops read their inputs once and
    write their outputs once; the baselines also write and read back their intermediates."""
    R, C = s.B * s.K, max(s.classes)
    n_calls = 1 + s.speed_repeats  # a warm-up call, then the timed ones
    steps = []
    e = 2  # bf16: the reader's head and logits
    steps.append(
        Step(
            "speed/head_class_log_softmax",
            "speed",
            "head_class_log_softmax",
            "bfloat16",
            {"N": R, "H": s.H, "V": s.V, "C": C},
            [
                Alloc("weight", (s.V, s.H), "bfloat16"),
                Alloc("hidden", (R, s.H), "bfloat16"),
                Alloc("baseline logits [N, V]", (R, s.V), "bfloat16"),
                Alloc("baseline log-softmax input", (R, C), "float32"),
            ],
            repeats=s.speed_repeats,
            calls=n_calls,
            moved_bytes=(R * s.H + C * s.H) * e + R * C * 4,
            flops=2 * R * C * s.H,
            baseline="hidden @ W.T -> gather -> log_softmax",
            baseline_moved_bytes=(R * s.H + s.V * s.H) * e + 2 * R * s.V * e + R * C * 4,
            baseline_flops=2 * R * s.V * s.H,
            allowance_s=JIT_ALLOWANCE_S,
        )
    )
    steps.append(
        Step(
            "speed/class_log_softmax",
            "speed",
            "class_log_softmax",
            "bfloat16",
            {"R": R, "V": s.V, "C": C},
            [
                Alloc("logits", (R, s.V), "bfloat16"),
                Alloc("baseline fp32 logits + log-softmax", (2, R, s.V), "float32"),
            ],
            repeats=s.speed_repeats,
            calls=n_calls,
            moved_bytes=R * C * (e + 4),
            baseline="log_softmax over V -> gather -> renormalise",
            baseline_moved_bytes=R * s.V * (e + 4 + 4),
            allowance_s=JIT_ALLOWANCE_S,
        )
    )
    steps.append(
        Step(
            "speed/retrieval_kl_loss",
            "speed",
            "retrieval_kl_loss (fwd+bwd)",
            "float32",
            {"B": s.kl_rows, "K": s.K},
            [Alloc("scores, reader log-likelihoods, grad, intermediates", (8, s.kl_rows, s.K), "float32")],
            repeats=s.speed_repeats,
            calls=n_calls,
            moved_bytes=4 * s.kl_rows * s.K * 3,
            baseline="softmax + log_softmax + F.kl_div (fwd+bwd)",
            baseline_moved_bytes=4 * s.kl_rows * s.K * 10,
            allowance_s=JIT_ALLOWANCE_S,
        )
    )
    B, K = s.fuse_rows, s.fuse_K
    steps.append(
        Step(
            "speed/fuse_candidates",
            "speed",
            "fuse_candidates",
            "float32",
            {"B": B, "K": K, "C": C},
            [Alloc("log-probs, the baseline's two [B, K, C] intermediates", (3, B, K, C), "float32")],
            repeats=s.speed_repeats,
            calls=n_calls,
            moved_bytes=4 * (B * K * C + B * K + B * C),
            baseline="exp * softmax(s) summed over K",
            baseline_moved_bytes=4 * (B * K * C + B * K + B * C) + 4 * 3 * B * K * C,
            allowance_s=JIT_ALLOWANCE_S,
        )
    )
    topk_bytes = s.N * s.D * 2 + s.Q * s.D * 4 + s.Q * s.k * 12
    steps.append(
        Step(
            "speed/topk_similarity",
            "speed",
            "topk_similarity",
            "float16",
            {"Q": s.Q, "N": s.N, "D": s.D, "k": s.k},
            [
                Alloc("fp16 index", (s.N, s.D), "float16"),
                Alloc("baseline scores [Q, N] + topk workspace", (2, s.Q, s.N), "float16"),
            ],
            repeats=s.speed_repeats,
            calls=n_calls,
            moved_bytes=topk_bytes,
            flops=2 * s.Q * s.N * s.D,
            baseline="matmul [Q, N] + torch.topk",
            baseline_moved_bytes=topk_bytes + s.Q * s.N * 2 * 2,
            baseline_flops=2 * s.Q * s.N * s.D,
            allowance_s=JIT_ALLOWANCE_S,
        )
    )
    if faiss_gpu:
        steps.append(
            Step(
                "speed/topk_similarity/faiss",
                "speed",
                "topk_similarity",
                "float16",
                {"Q": s.Q, "N": s.N, "D": s.D, "k": s.k},
                [Alloc("fp16 index", (s.N, s.D), "float16"), Alloc("faiss GpuIndexFlatIP (fp32)", (s.N, s.D), "float32")],
                repeats=s.speed_repeats,
                calls=n_calls,
                moved_bytes=topk_bytes,
                flops=2 * s.Q * s.N * s.D,
                baseline="faiss GpuIndexFlatIP (fp32 copy of the index)",
                baseline_moved_bytes=s.N * s.D * 4 + s.Q * s.D * 4 + s.Q * s.k * 12,
                baseline_flops=2 * s.Q * s.N * s.D,
                allowance_s=JIT_ALLOWANCE_S + 5.0,  # building the faiss index on the GPU
            )
        )
    return steps


def index_search_step(s: Shapes) -> Step:
    """``jomed_fast.index.Index.search`` (what ``Retrieval.search`` runs per head) on a GPU-resident
    index against the CPU memory-mapped one, on the same files."""
    cpu_s = (1 + s.cpu_repeats) * s.Q * s.search_N * CPU_SEARCH_S_PER_QUERY_ROW
    return Step(
        "index_search",
        "index_search",
        "Index.search (image head)",
        "float16",
        {"Q": s.Q, "N": s.search_N, "D": s.D, "k": s.k},
        [Alloc("both fp16 heads on the GPU (Index.to)", (2, s.search_N, s.D), "float16")],
        repeats=s.speed_repeats,
        calls=1 + s.speed_repeats,
        moved_bytes=s.search_N * s.D * 2,
        flops=2 * s.Q * s.search_N * s.D,
        baseline="the CPU memory-mapped index (ops.topk_similarity's chunked path)",
        allowance_s=cpu_s + 2.0,
        note=f"CPU side estimated from the 2-core development machine's measured rate, {cpu_s:.1f} s",
        extra={"cpu_repeats": s.cpu_repeats},
    )


def small_reader_config():
    """The ``small`` Qwen2-VL reader's config (jomed_fast.readers.offline_checkpoints, ``small``) as the
    memory planner reads it; building the real one trains a tokenizer (seconds), which a dry run
    must not. tests/test_gpu_check.py holds the two to the same planner description."""
    from transformers import Qwen2VLConfig

    text = dict(
        model_type="qwen2_vl_text",
        vocab_size=151_936,
        hidden_size=896,
        intermediate_size=4736,
        num_hidden_layers=4,
        num_attention_heads=7,
        num_key_value_heads=1,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
    )
    vision = dict(depth=2, embed_dim=320, hidden_size=896, num_heads=4, mlp_ratio=4, patch_size=14, spatial_merge_size=2)
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False).to_dict()


def planner_runs(s: Shapes) -> dict:
    """The two memory-planner runs the check measures: one stage-1 step (NF4 + LoRA r = 8, gradient
    checkpointing) and one stage-2 scoring forward of the frozen reader (no grad, KV-cache), both
    ``tokens`` text tokens, bf16 compute (``jomed_fast.memory.Run`` keyword arguments)."""
    common = dict(K=1, prefix_tokens=s.tokens, suffix_tokens=0, image_tokens=0, layout="paper", quantization="nf4")
    return {
        "stage1": dict(stage="stage1", gradient_checkpointing=True, **common),
        "stage2": dict(stage="stage2", **common),
    }


def memory_planner_step(s: Shapes, config) -> Step:
    """The planner's predictions for :func:`planner_runs` (their larger total is the step's peak)."""
    from jomed_fast.memory import Run, plan

    totals = {stage: plan(config, Run(**kw)).total for stage, kw in planner_runs(s).items()}
    peak_stage = max(totals, key=lambda k: totals[k])
    return Step(
        "memory_planner",
        "memory_planner",
        "jomed_fast.memory.plan vs torch.cuda.max_memory_allocated",
        "bfloat16",
        {"T": s.tokens},
        [Alloc(f"planner's peak ({peak_stage}, small Qwen2-VL reader)", (totals[peak_stage],), "uint8")],
        allowance_s=2 * PLANNER_ALLOWANCE_S,
        extra={"predicted_totals": totals},
    )


def fusion_step(s: Shapes, config) -> Step:
    """bench/fusion_throughput.py --size small --device cuda (bf16) at K in {4, K}: its peak is bounded
    by the planner's inference run at the larger K (unquantized bf16, the paper layout, B = 2)."""
    from jomed_fast.memory import Run, plan

    Ks = sorted({4, s.K})
    predicted = plan(
        config, Run(stage="inference", K=max(Ks), batch=2, image_tokens=16, quantization="none", layout="paper")
    ).total
    return Step(
        "fusion_throughput",
        "fusion",
        "bench/fusion_throughput.py --size small --device cuda",
        "bfloat16",
        {"K": max(Ks), "B": 2},
        [Alloc("planner's inference peak (small reader, bf16)", (predicted,), "uint8")],
        allowance_s=FUSION_ALLOWANCE_S,
        extra={"k_values": Ks},
    )


def plan_steps(s: Shapes, *, faiss_gpu: bool, config=None) -> list[Step]:
    """Every step, in the order the CUDA run executes them. ``config``: the small reader's (default
    :func:`small_reader_config`)."""
    config = small_reader_config() if config is None else config
    return [
        *correctness_steps(s),
        *speed_steps(s, faiss_gpu),
        index_search_step(s),
        fusion_step(s, config),
        memory_planner_step(s, config),
    ]


def budget_bytes(memory_gb: float) -> int:
    """What the steps may allocate on a device of ``memory_gb`` GB: its memory less the CUDA context."""
    return int(memory_gb * GB) - CUDA_CONTEXT_BYTES


def check_budget(steps: list[Step], memory_gb: float, device: Device) -> str | None:
    """None when every step fits ``memory_gb`` and the estimated total fits TIME_LIMIT_S, else a
    one-line message naming the first step that does not fit (and how many others)."""
    budget = budget_bytes(memory_gb)
    over = [st for st in steps if st.alloc_bytes > budget]
    if over:
        first = over[0]
        more = f" (and {len(over) - 1} more steps)" if len(over) > 1 else ""
        hint = ""
        if "N" in first.dims and first.kind in ("correctness", "speed"):
            per_row = first.alloc_bytes / first.dims["N"]  # every allocation of an N-row step grows with N
            hint = f"; --index-rows {max(0, int(budget // per_row))} would fit it"
        return (
            f"step {first.name}: needs {first.alloc_bytes / GB:.2f} GB of GPU memory, more than the "
            f"--memory-gb {memory_gb:g} budget ({budget / GB:.2f} GB after the CUDA context){more}{hint}"
        )
    total = sum(st.estimated_seconds(device) for st in steps)
    if total > TIME_LIMIT_S:
        return f"plan: estimated {total:.0f} s on {device.name}, more than the {TIME_LIMIT_S} s the check may take"
    return None
