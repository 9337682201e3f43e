"""``python -m jomed_fast.memory``: the three JOMED stages for both shipped readers on an L40."""

from __future__ import annotations

import argparse
import sys

from .plan import GB, Run, format_table, plan, suggest

L40_BYTES = 48 * GB
# Image tokens of a 448 x 448 px medical image: Qwen2-VL (448/14)^2 / 2^2 = 256; Pixtral at
# 512 x 512 px: (512/16)^2 = 1024 [IMG] + 32 row breaks = 1056.
MODELS = {"qwen2_vl_7b": 256, "pixtral_12b": 1056}


def default_runs(image_tokens: int, args) -> list[Run]:
    common = dict(prefix_tokens=args.prefix, suffix_tokens=args.suffix, image_tokens=image_tokens,
                  quantization=args.quantization, lora_rank=args.lora_rank, layout=args.layout)
    return [Run(stage="stage1", K=4, batch=args.batch, gradient_checkpointing=True, **common),
            Run(stage="stage2", K=50, batch=args.batch, **common),
            Run(stage="inference", K=4, batch=args.batch, **common)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jomed_fast.memory", description=__doc__)
    ap.add_argument("--model", action="append", help="shipped name or config.json path (default: both shipped)")
    ap.add_argument("--budget-gb", type=float, default=40.0, help="peak budget for suggest (default 40 of the L40's 48)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prefix", type=int, default=64, help="query text tokens")
    ap.add_argument("--suffix", type=int, default=128, help="candidate caption/report tokens")
    ap.add_argument("--image-tokens", type=int, default=None)
    ap.add_argument("--quantization", default="nf4", choices=("nf4", "int8", "none"))
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--layout", default="shared_query", choices=("paper", "shared_query"))
    args = ap.parse_args(argv)
    budget = int(args.budget_gb * GB)
    try:
        models = args.model or list(MODELS)
        for m in models:
            n_img = args.image_tokens or MODELS.get(m, 256)
            for run in default_runs(n_img, args):
                p = plan(m, run, name=m)
                print(format_table(p))
                print(f"- fits {args.budget_gb:g} GB: {p.fits(budget)}; L40 48 GB: {p.fits(L40_BYTES)}")
                if not p.fits(budget):
                    s = suggest(m, run, budget)
                    if s is None:
                        print(f"- suggest: nothing fits {args.budget_gb:g} GB")
                    else:
                        r, sp = s
                        print(f"- suggest: batch={r.batch} chunk={r.chunk} checkpointing={r.gradient_checkpointing} "
                              f"-> {sp.total / GB:.2f} GB")
                print()
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
