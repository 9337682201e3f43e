"""The GPU check's plan: every step in the order the CUDA run executes it. Pure arithmetic: nothing
here touches a GPU, so the dry run (and CI) plans and checks exactly what the CUDA run executes.

The parts: ``_gpu_check_devices`` (the device table, the roofline), ``_gpu_check_steps`` (what a
step is, the sizes, the shared constants), ``_gpu_check_op_steps`` (the ops' correctness and speed
steps); here the pipeline's steps (the index search, the scoring benchmark, the memory planner),
:func:`plan_steps` and :func:`check_budget`, and the names of all four for the callers.

A step's estimated time is the roofline floor of every call it makes, plus a stated allowance for
what the roofline does not model (Triton's first-launch compilation, model loading, the CPU path).
"""

from __future__ import annotations

from bench._gpu_check_devices import DEVICES, Device, bandwidth_fraction, device_slug, floor_seconds, lookup_device
from bench._gpu_check_op_steps import correctness_steps, speed_steps
from bench._gpu_check_steps import (
    CPU_SEARCH_S_PER_QUERY_ROW,
    CUDA_CONTEXT_BYTES,
    FUSION_ALLOWANCE_S,
    GB,
    PLANNER_ALLOWANCE_S,
    TIME_LIMIT_S,
    TOLERANCES,
    TOPK_SCORE_TOLERANCE,
    Alloc,
    Shapes,
    Step,
)

__all__ = [
    "DEVICES",
    "GB",
    "TIME_LIMIT_S",
    "TOLERANCES",
    "TOPK_SCORE_TOLERANCE",
    "Alloc",
    "Device",
    "Shapes",
    "Step",
    "bandwidth_fraction",
    "budget_bytes",
    "check_budget",
    "correctness_steps",
    "device_slug",
    "floor_seconds",
    "lookup_device",
    "plan_steps",
    "planner_runs",
    "speed_steps",
]


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
    vision = dict(
        depth=2, embed_dim=320, hidden_size=896, num_heads=4, mlp_ratio=4, patch_size=14, spatial_merge_size=2
    )
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False).to_dict()


# Planner rows a GPU-check step does not allocate: the retriever (the check runs the reader alone)
# and the CUDA context (budget_bytes takes it off the device's memory already).
_NOT_ALLOCATED = ("retriever", "CUDA context")


def reader_bytes(p) -> int:
    """A ``MemoryPlan``'s total less the rows of :data:`_NOT_ALLOCATED`."""
    return sum(v for k, v in p.rows.items() if not k.startswith(_NOT_ALLOCATED))


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

    totals = {stage: reader_bytes(plan(config, Run(**kw))) for stage, kw in planner_runs(s).items()}
    peak_stage = max(totals, key=lambda k: totals[k])
    return Step(
        "memory_planner",
        "memory_planner",
        "jomed_fast.memory.plan vs torch.cuda.max_memory_allocated",
        "bfloat16",
        {"T": s.tokens},
        [Alloc(f"planner's peak of the reader ({peak_stage}, small Qwen2-VL)", (totals[peak_stage],), "uint8")],
        allowance_s=2 * PLANNER_ALLOWANCE_S,
        extra={"predicted_totals": totals},
    )


def fusion_step(s: Shapes, config) -> Step:
    """bench/fusion_throughput.py --size small --device cuda (bf16) at K in {4, K}: its peak is bounded
    by the planner's inference run at the larger K (unquantized bf16, the paper layout, B = 2)."""
    from jomed_fast.memory import Run, plan

    Ks = sorted({4, s.K})
    run = Run(stage="inference", K=max(Ks), batch=2, image_tokens=16, quantization="none", layout="paper")
    predicted = reader_bytes(plan(config, run))
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


def _rows_that_fit(step: Step, budget: int) -> int:
    """The largest N at which ``step`` fits ``budget``: its [N, ...] allocations grow with N, the rest
    (a reference chunk of a fixed row count) stays (and shrinks too once N is below it)."""
    n = step.dims["N"]
    fixed = sum(a.nbytes for a in step.allocs if n not in a.shape)
    per_row = (step.alloc_bytes - fixed) / n
    return max(0, int((budget - fixed) // per_row))


def check_budget(steps: list[Step], memory_gb: float, device: Device) -> str | None:
    """None when every step fits ``memory_gb`` and the estimated total fits TIME_LIMIT_S, else a
    one-line message naming the first step that does not fit (and how many others)."""
    budget = budget_bytes(memory_gb)
    over = [st for st in steps if st.alloc_bytes > budget]
    if over:
        first = over[0]
        more = f" (and {len(over) - 1} more steps)" if len(over) > 1 else ""
        hint = ""
        rows = [_rows_that_fit(st, budget) for st in over if st.op == "topk_similarity"]
        if rows and over[0].op == "topk_similarity":
            hint = f"; --index-rows {min(rows)} would fit the top-k steps"
        return (
            f"step {first.name}: needs {first.alloc_bytes / GB:.2f} GB of GPU memory, more than the "
            f"--memory-gb {memory_gb:g} budget ({budget / GB:.2f} GB after the CUDA context){more}{hint}"
        )
    total = sum(st.estimated_seconds(device) for st in steps)
    if total > TIME_LIMIT_S:
        return f"plan: estimated {total:.0f} s on {device.name}, more than the {TIME_LIMIT_S} s the check may take"
    return None
