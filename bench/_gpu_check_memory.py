"""The GPU check's memory-planner step (CUDA only): the small Qwen2-VL reader in NF4 + LoRA, one
stage-1 step and one stage-2 scoring forward, each step's ``torch.cuda.max_memory_allocated`` growth
against the rows ``jomed_fast.memory.plan`` predicts for it, and the resident weights against the
planner's weight rows."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from bench._gpu_check_plan import Shapes, Step, planner_runs

# the CPU test's bound on the planner's activation rows against a measured step (tests/test_memory.py)
PLANNER_BOUND = (0.65, 1.15)


def _reader_rows(rows: dict) -> int:
    """The planner's rows a reader step allocates beyond what is resident before it."""
    return sum(v for k, v in rows.items() if k.startswith("activations") or k in ("embeddings in flight", "KV-cache"))


def memory_planner(step: Step, shapes: Shapes) -> dict:
    """The small Qwen2-VL reader in NF4 + LoRA on the GPU: its resident weights, one stage-1 step
    (checkpointed forward + backward) and one stage-2 scoring forward (no grad, KV-cache), each
    step's ``max_memory_allocated`` growth over the bytes allocated before it, against the planner."""
    from jomed_fast.memory import Run, plan
    from jomed_fast.readers import load_reader, tiny

    path = Path(tempfile.gettempdir(), "jomed_fast_readers", f"qwen2_vl-small-build{tiny.BUILD_VERSION}")
    path = tiny.build("qwen2_vl", path, size="small")  # the reader fusion_throughput.py built (or builds)
    runs = {stage: Run(**kw) for stage, kw in planner_runs(shapes).items()}
    plans = {stage: plan(path, run) for stage, run in runs.items()}
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    reader = load_reader(path, quantization="nf4", device="cuda")
    reader.add_lora()
    model = reader.hf_model
    resident = torch.cuda.memory_allocated() - before
    predicted_resident = sum(
        v for k, v in plans["stage1"].rows.items() if k.startswith("weights") or k.startswith("LoRA weights")
    )

    def tokens(T: int) -> torch.Tensor:
        return torch.randint(0, 700, (1, T), generator=torch.Generator().manual_seed(T)).cuda()

    def train_step(T: int) -> None:
        out = model(input_ids=tokens(T), use_cache=False, logits_to_keep=1)
        out.logits.float().sum().backward()
        model.zero_grad(set_to_none=False)

    def score_step(T: int) -> None:
        with torch.no_grad():
            model(input_ids=tokens(T), use_cache=True, logits_to_keep=1)

    measured = {}
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for stage, fn in (("stage1", train_step), ("stage2", score_step)):
        if stage == "stage2":
            model.zero_grad(set_to_none=True)
            model.gradient_checkpointing_disable()
            model.eval()
        fn(64)
        fn(64)  # warm-up: cuBLAS workspaces and the LoRA gradients exist from here on
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(shapes.tokens)
        measured[stage] = torch.cuda.max_memory_allocated() - base
    rows = []
    for stage in ("stage1", "stage2"):
        predicted = _reader_rows(plans[stage].rows)
        ratio = predicted / measured[stage]
        rows.append(
            {
                "step": stage,
                "tokens": shapes.tokens,
                "predicted_bytes": predicted,
                "measured_bytes": measured[stage],
                "ratio": ratio,
                "within_cpu_test_bound": PLANNER_BOUND[0] <= ratio <= PLANNER_BOUND[1],
                "rows": "activations + embeddings in flight + KV-cache",
            }
        )
    rows.append(
        {
            "step": "resident weights (NF4 + LoRA)",
            "tokens": 0,
            "predicted_bytes": predicted_resident,
            "measured_bytes": resident,
            "ratio": predicted_resident / resident,
            "within_cpu_test_bound": PLANNER_BOUND[0] <= predicted_resident / resident <= PLANNER_BOUND[1],
            "rows": "weights + LoRA weights",
        }
    )
    return {"name": step.name, "reader": str(path), "rows": rows, "bound": list(PLANNER_BOUND)}
