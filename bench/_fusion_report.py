"""The fusion benchmark's records and how they are shown: the record fields, the text and Markdown
tables, the plot, the cost-growth fit and the cross-layout ratio (``bench/fusion_throughput.py``)."""

from __future__ import annotations

import dataclasses
import math
import statistics

import numpy as np
import torch

from bench import _harness as H
from jomed_fast.scoring import flops as F

RECORD_FIELDS = (
    "method",
    "layout",
    "K",
    "queries_per_s",
    "candidates_per_s",
    "speedup_vs_hf_batched",
    "speedup_vs_reference_loop",
    "peak_mem_bytes",
    "llm_tokens",
    "vision_images",
    "flop_model_speedup",
    "fraction_of_flop_bound",
    "max_abs_logprob_diff",
)
Col = H.Column
COLUMNS = [
    Col("K", 3, "K"),
    Col("method", 19, "method", align="<"),
    Col("layout", 12, "layout", align="<"),
    Col("q/s", 9, "queries_per_s", ".3g"),
    Col("cand/s", 9, "candidates_per_s", ".3g"),
    Col("x hf", 6, "speedup_vs_hf_batched", ".2f"),
    Col("x ref", 7, "speedup_vs_reference_loop", ".1f"),
    Col("flop x", 7, "flop_model_speedup", ".2f"),
    Col("of bound", 8, "fraction_of_flop_bound", ".0%"),
    Col("peak MiB", 9, lambda r: r["peak_mem_bytes"] / 2**20, ".0f"),
    Col("llm tok", 9, "llm_tokens", "d"),
    Col("images", 7, "vision_images", "d"),
    Col("max|Δ|", 8, "max_abs_logprob_diff", ".1e"),
]
MARKDOWN = (
    "K",
    "method",
    "layout",
    "queries/s",
    "candidates/s",
    "× hf_batched (same layout)",
    "FLOP model ×",
    "of FLOP bound",
    "× reference_loop",
    "peak memory MiB",
    "LLM tokens",
    "images",
    "max abs Δ log p",
)


@dataclasses.dataclass
class Run:
    """One method at one K: its scores (checked call), timings, counts and peak memory."""

    method: str
    layout: str
    K: int
    queries: int
    scores: torch.Tensor | None = None
    times: list[float] = dataclasses.field(default_factory=list)
    peak: int = 0
    llm_tokens: int = 0
    vision_images: int = 0
    steps: list[int] = dataclasses.field(default_factory=list)
    suffix_padding: float | None = None  # toolkit: ScoreStats suffix slots / real suffix + node tokens
    name = property(lambda self: f"{self.method}/{self.layout}")
    seconds = property(lambda self: statistics.median(self.times))
    queries_per_s = property(lambda self: self.queries / self.seconds)


def make_record(run: Run, runs: dict[str, Run], diffs: dict[str, float], flops: dict[str, F.Flops]) -> dict:
    base, ref = runs.get(f"hf_batched/{run.layout}"), runs.get("reference_loop/paper")
    per_query = {name: flops[name].total / runs[name].queries for name in runs}
    predicted = per_query[base.name] / per_query[run.name] if base else float("nan")
    measured = run.queries_per_s / base.queries_per_s if base else float("nan")
    values = (
        run.method,
        run.layout,
        run.K,
        run.queries_per_s,
        run.queries_per_s * run.K,
        measured,
        run.queries_per_s / ref.queries_per_s if ref else float("nan"),
        run.peak,
        run.llm_tokens,
        run.vision_images,
        predicted,
        measured / predicted if base else float("nan"),
        diffs[run.name],
    )
    return dict(zip(RECORD_FIELDS, values, strict=True))


def format_markdown(records: list[dict]) -> str:
    """The records as a Markdown table (as docs/benchmarks.md shows them)."""
    rows = [
        [
            str(r["K"]),
            f"`{r['method']}`",
            r["layout"],
            f"{r['queries_per_s']:.3g}",
            f"{r['candidates_per_s']:.3g}",
            f"{r['speedup_vs_hf_batched']:.2f}",
            f"{r['flop_model_speedup']:.2f}",
            f"{r['fraction_of_flop_bound']:.0%}",
            f"{r['speedup_vs_reference_loop']:.1f}",
            f"{r['peak_mem_bytes'] / 2**20:.0f}",
            str(r["llm_tokens"]),
            str(r["vision_images"]),
            f"{r['max_abs_logprob_diff']:.1e}",
        ]
        for r in records
    ]
    return H.markdown_table(MARKDOWN, "rllrrrrrrrrrr", rows)


def write_plot(records: list[dict], path: str, title: str) -> None:
    fig, ax = H.pyplot().subplots(figsize=(7, 4.5))
    for key in sorted({(r["method"], r["layout"]) for r in records}):
        rows = sorted((r for r in records if (r["method"], r["layout"]) == key), key=lambda r: r["K"])
        (line,) = ax.plot(
            [r["K"] for r in rows], [r["queries_per_s"] for r in rows], marker="o", label=f"{key[0]} ({key[1]})"
        )
        if key[0] != "hf_batched" and all(math.isfinite(r["flop_model_speedup"]) for r in rows):
            # the FLOP-model bound: hf_batched's measured rate (same layout) x the predicted speed-up
            bound = [r["queries_per_s"] / r["fraction_of_flop_bound"] for r in rows]
            ax.plot([r["K"] for r in rows], bound, linestyle="--", color=line.get_color(), alpha=0.6)
    ax.set(xscale="log", yscale="log", xlabel="K (candidates per query)", ylabel="queries / s")
    ax.set_title(title + "\n(dashed: FLOP-model bound, hf_batched's measured rate x predicted speed-up)", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    H.save_png(fig, path)


def summarize(ks: list[int], runs: dict[str, Run], flops: dict[str, dict]) -> tuple[dict, list]:
    """Per method the least-squares cost growth ``t(K) = prefix + K × per_candidate`` (seconds per
    query; NaN from one K); per K the shared_query toolkit over hf_batched on the paper layout:
    two different prompts (``shared_query`` puts the query before the candidate), so the ratio is
    a speed-up only for a reader trained and distilled on ``shared_query`` (docs/training.md)."""
    growth = {}
    for key in sorted({r.name for r in runs.values()}):
        points = [(float(r.K), r.seconds / r.queries) for r in runs.values() if r.name == key]
        slope, intercept = np.polyfit(*zip(*points), 1) if len({k for k, _ in points}) > 1 else (math.nan, math.nan)
        growth[key] = {"prefix_s": float(intercept), "per_candidate_s": float(slope)}
    cross = []
    for K in ks:
        sq, hp = runs.get(f"jomed_shared_query/shared_query@{K}"), runs.get(f"hf_batched/paper@{K}")
        if sq and hp:
            cross.append(
                {
                    "K": K,
                    "measured": sq.queries_per_s / hp.queries_per_s,
                    "flop_model": flops[f"hf_batched/paper@{K}"]["per_query"]
                    / flops[f"jomed_shared_query/shared_query@{K}"]["per_query"],
                }
            )
    return growth, cross


def print_report(records: list[dict], growth: dict, cross: list, markdown: bool = False) -> None:
    """The table, the cost growth per method and the cross-layout ratios on stdout."""
    print(H.text_table(COLUMNS, records))
    print("\ncost growth, seconds per query = prefix + K x per_candidate:")
    for key, g in growth.items():
        print(f"  {key:<34} {g['prefix_s']:>9.4f} + K x {g['per_candidate_s']:.4f}")
    for c in cross:
        print(
            f"K={c['K']:>3}: jomed_shared_query over hf_batched on the paper layout: {c['measured']:.2f}x "
            f"(FLOP model {c['flop_model']:.2f}x)"
        )
    if cross:
        print(
            "  (two different prompts: shared_query puts the query before the candidate, so these ratios "
            "hold for a reader trained on shared_query; on the paper layout compare jomed_paper with "
            "hf_batched/paper)"
        )
    if markdown:
        print("\n" + format_markdown(records))
