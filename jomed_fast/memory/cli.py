"""``jomed-fast plan-memory`` (also ``python -m jomed_fast.memory``): the three JOMED stages for
both shipped readers on an L40; ``--config run.yaml`` and flag overrides as every subcommand."""

from __future__ import annotations

from ..cli.options import Command, Opt
from ..prompts import LAYOUTS
from .plan import GB, Run, format_table, plan, suggest

L40_BYTES = 48 * GB
# Image tokens of a 448 x 448 px medical image: Qwen2-VL (448/14)^2 / 2^2 = 256; Pixtral at
# 512 x 512 px: (512/16)^2 = 1024 [IMG] + 32 row breaks = 1056.
MODELS = {"qwen2_vl_7b": 256, "pixtral_12b": 1056}

OPTS = (
    Opt(
        "model",
        list,
        None,
        "shipped name or config.json path (repeat the flag or give several)",
        default_doc=f"both shipped ({', '.join(MODELS)})",
    ),
    Opt("budget_gb", float, 40.0, "peak budget for suggest, in GB (the L40 has 48)"),
    Opt("batch", int, 1, "queries per step"),
    Opt("prefix", int, 64, "query text tokens"),
    Opt("suffix", int, 128, "candidate caption/report tokens"),
    Opt(
        "image_tokens",
        int,
        None,
        "image tokens per image",
        default_doc="the shipped model's: " + ", ".join(f"{n} for {m}" for m, n in MODELS.items()),
    ),
    Opt("quantization", str, "nf4", "reader weights", choices=("nf4", "int8", "none")),
    Opt("lora_rank", int, 8, "LoRA rank"),
    Opt("layout", str, "paper", "prompt layout", choices=LAYOUTS),
    Opt("index_rows", int, 0, "rows of an index held on the GPU (Index.to) in stage 2 and inference; 0: on the CPU"),
    Opt("index_dim", int, 768, "embedding width of that index"),
)


def default_runs(image_tokens: int, v: dict) -> list[Run]:
    common = dict(
        prefix_tokens=v["prefix"],
        suffix_tokens=v["suffix"],
        image_tokens=image_tokens,
        quantization=v["quantization"],
        lora_rank=v["lora_rank"],
        layout=v["layout"],
        index_rows=v["index_rows"],
        index_dim=v["index_dim"],
    )
    return [
        Run(stage="stage1", K=4, batch=v["batch"], gradient_checkpointing=True, **common),
        Run(stage="stage2", K=50, batch=v["batch"], **common),
        Run(stage="inference", K=4, batch=v["batch"], **common),
    ]


def run_plan_memory(v: dict) -> int:
    budget = int(v["budget_gb"] * GB)
    for m in v["model"] or list(MODELS):
        n_img = v["image_tokens"] if v["image_tokens"] is not None else MODELS.get(m, 256)
        for run in default_runs(n_img, v):
            p = plan(m, run, name=m)
            print(format_table(p))
            print(f"- fits {v['budget_gb']:g} GB: {p.fits(budget)}; L40 48 GB: {p.fits(L40_BYTES)}")
            if not p.fits(budget):
                s = suggest(m, run, budget)
                if s is None:
                    print(f"- suggest: nothing fits {v['budget_gb']:g} GB")
                else:
                    r, sp = s
                    print(
                        f"- suggest: batch={r.batch} chunk={r.chunk} checkpointing={r.gradient_checkpointing} "
                        f"-> {sp.total / GB:.2f} GB"
                    )
            print()
    return 0


COMMANDS = (
    Command(
        "plan-memory",
        "predicted peak GPU memory of the three stages",
        "The peak GPU memory of stage 1, stage 2 and inference for each model, whether it fits the "
        "budget and an L40's 48 GB, and the fastest-looking settings that fit when it does not.",
        OPTS,
        run_plan_memory,
    ),
)


def main(argv=None) -> int:
    """``python -m jomed_fast.memory``: the same options and errors as ``jomed-fast plan-memory``."""
    from ..cli import run_standalone

    return run_standalone(COMMANDS[0], argv, prog="python -m jomed_fast.memory")
