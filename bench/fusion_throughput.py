r"""Candidate scoring throughput: the toolkit against what users would otherwise run, side by side.

    python bench/fusion_throughput.py                     # tiny reader, CPU, synthetic task (< 3 min)
    python bench/fusion_throughput.py --size small        # the real models' proportions (README figures)
    python bench/fusion_throughput.py --size small --clock cpu --markdown   # on a shared CPU machine
    python bench/fusion_throughput.py --reader PATH --device cuda --quantization nf4

Defaults: ``tiny`` B = 4 queries (1 for ``reference_loop``), 3 timed calls (2), 32-px images;
``small`` B = 2 (1), 2 timed calls (1), 112-px images (16 image tokens, as the real processor gives);
K ∈ {1, 4, 16, 50}; one torch thread (``--threads``); fp32 on CPU, bf16 on CUDA.

Work measured: class log-probabilities ``[B, K, C]`` of B queries × K retrieved candidates each
(``log p(c | prompt(query b, candidate k))``, C = 5 classes of the ``synthetic`` task), from the raw
inputs (images, captions) to the scores — what retriever training (K = 50) and inference (K = 4)
spend their time on. Every method runs on the same reader (its unmodified HF model), the same
queries and candidates and the same K:

* ``reference_loop`` — the cost structure of the published JOMED code: one ``paper``-layout prompt
  per candidate through the processor and ``generate(max_new_tokens=8, use_cache=False,
  output_scores=True, do_sample=False)`` in chunks of 5 prompts (left-padded); the class scores are
  ``log_softmax`` over the class tokens of the first generated step's full-vocabulary scores (the
  run checks once that these equal the raw logits: no logits processor changes them).
* ``hf_batched`` — the best plain-transformers version: the K prompts of a query left-padded into
  one batch, one forward with ``logits_to_keep=1``, ``log_softmax`` over the class-token logits.
  Run on both layouts.
* ``jomed_paper`` / ``jomed_shared_query`` — ``CandidateScorer(reader, task, layout).score`` on all
  B queries at once (vision once per distinct image, shared prefix KV, class head, C++ packing).

Agreement first: at each K, the first call of every method is compared with the other methods of
its layout (``max_abs_logprob_diff``: max |Δ log p| over the queries both ran); above the tolerance
(1e-3 in fp32) the run stops with an error before any speed is reported.

Timing: per K, the methods run round-robin (so load from other processes falls on all alike);
``queries_per_s = B / t`` with t the median over the timed calls (the checked call included; one
untimed warm-up call of each method at the first K); ``--clock cpu`` (CPU only, one thread) times
the process's CPU time instead of the wall time, for a machine shared with other jobs, where the
wall time also counts the time spent waiting for a core. ``reference_loop`` runs the first
``--reference-queries`` queries only (its rate does not depend on B: each chunk of 5 prompts is
independent) and ``--reference-repeats`` calls. ``candidates_per_s = B·K / t``.

Counts (from the checked call): ``llm_tokens`` — real (unpadded) tokens through the language model,
summed over forwards (``generate``: over its steps); ``vision_images`` — images through the vision
tower (forward hooks for the HF methods, ``ScoreStats`` for the toolkit).

FLOP model (``jomed_fast.scoring.flops``, from the prompts' token and image counts):
``flop_model_speedup = FLOPs(hf_batched, same layout) / FLOPs(method)`` per query, and
``fraction_of_flop_bound = speedup_vs_hf_batched / flop_model_speedup``.

Memory: ``peak_mem_bytes`` is, on CUDA, ``torch.cuda.max_memory_allocated`` (reset before each
call); on CPU the process's peak resident set (VmHWM) during the method's calls, reset before each
call through ``/proc/self/clear_refs`` after ``malloc_trim(0)`` hands freed heap pages back — so it
includes the weights (the same for all methods) and is the max over the method's calls at that K.

Cost growth: per method, time per query against K fitted as ``t(K) = prefix + K × per_candidate``
(least squares over the K values).

Outputs: a table on stdout (progress on stderr), ``bench/results/fusion_throughput.json`` (records
with exactly ``RECORD_FIELDS``, plus the configuration, load averages, the raw times, FLOPs, fits and
the padding factors the FLOP model leaves out), ``--markdown`` the table as Markdown, and a PNG of
queries/s against K beside it. ``--profile``: one call per method at the largest K under
``torch.profiler`` (trace ``fusion_throughput.pt.trace.json`` beside the JSON, top ops on stderr);
every call sits in an NVTX range ``bench.<method>.<layout>`` (CUDA) so ``nsys profile`` reads the
methods and the scorer's stages (``jomed.vision/prefix/suffix/head``) on one timeline.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jomed_fast import prompts as _prompts
from jomed_fast._files import atomic_write_via
from jomed_fast.scoring import Candidate, CandidateScorer
from jomed_fast.scoring import flops as F
from jomed_fast._profiling import stage

METHODS = ("reference_loop", "hf_batched", "jomed_paper", "jomed_shared_query")
RECORD_FIELDS = ("method", "layout", "K", "queries_per_s", "candidates_per_s", "speedup_vs_hf_batched",
                 "speedup_vs_reference_loop", "peak_mem_bytes", "llm_tokens", "vision_images",
                 "flop_model_speedup", "fraction_of_flop_bound", "max_abs_logprob_diff")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TASK = "synthetic"
CHUNK = 5  # prompts per generate call in the published code
MAX_NEW_TOKENS = 8
# per --size: (queries, reference queries, repeats, reference repeats, image size in px)
DEFAULTS = {"tiny": (4, 1, 3, 2, 32), "small": (2, 1, 2, 1, 112)}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Workload
# ---------------------------------------------------------------------------------------------
def make_workload(queries: int, kmax: int, image_size: int, seed: int):
    """B query images (test samples) and B lists of ``kmax`` candidates (index records drawn
    without replacement per query; a record drawn for two queries is one object, as in an index)."""
    from jomed_fast.data.synthetic import SyntheticGenerator

    index_size = max(64, 4 * kmax)
    gen = SyntheticGenerator(seed=seed, image_size=image_size, n_test=max(queries, 1), index_size=index_size)
    qimgs = [gen.sample("test", b).image for b in range(queries)]
    rng = np.random.default_rng(seed)
    records: dict[int, Candidate] = {}

    def record(i: int) -> Candidate:
        if i not in records:
            r = gen.index_record(i)
            records[i] = Candidate(r.image, r.text, r.id)
        return records[i]

    cands = [[record(int(i)) for i in rng.choice(index_size, kmax, replace=False)] for _ in range(queries)]
    return qimgs, cands


def prompt_shapes(reader, task, layout: str, qimgs, cands) -> list[list[F.Prompt]]:
    """``[B][K]`` ``flops.Prompt``: each prompt's shared prefix (as ``split_query`` finds it) and
    suffix in tokens with the image placeholders expanded, and its images' patch counts."""
    proc = reader.processor
    info: dict[int, tuple[int, int]] = {}  # id(image) -> (placeholder tokens, patches)

    def image_info(img) -> tuple[int, int]:
        if id(img) not in info:
            out = proc.preprocess_images([_prompts.as_image(img)])
            tokens = len(proc.image_placeholder_ids(out, 0))
            if proc.family == "qwen2_vl":
                t, h, w = (int(x) for x in out["image_grid_thw"][0])
                patches = t * h * w
            else:
                h, w = (int(x) for x in out["image_sizes"][0])
                patches = (h // proc.patch_size) * (w // proc.patch_size)
            info[id(img)] = (tokens, patches)
        return info[id(img)]

    def length(ids: list[int], images: list) -> int:
        return len(ids) + sum(image_info(i)[0] - 1 for i in images)

    shapes = []
    for q, row in zip(qimgs, cands):
        split = _prompts.split_query(proc, layout, task, q, None, row)
        key = (tuple(split.prefix_ids), tuple(id(i) for i in split.prefix_images))
        P = length(split.prefix_ids, split.prefix_images)
        shapes.append([
            F.Prompt(prefix=(key, P), suffix=length(seg, imgs),
                     images=tuple((id(i), image_info(i)[1]) for i in list(split.prefix_images) + list(imgs)))
            for seg, imgs in zip(split.segments, split.segment_images)
        ])
    return shapes


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------
class Counter:
    """Real tokens into the language model and images into the vision tower, by forward hooks."""

    def __init__(self, reader):
        self.reader, self.tokens, self.images, self._handles = reader, 0, 0, []

    def __enter__(self):
        model = self.reader.hf_model.model

        def on_decoder(module, args, kwargs):
            mask = kwargs.get("attention_mask")
            x = kwargs.get("inputs_embeds")
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                self.tokens += int(mask.sum())
            elif x is not None:
                self.tokens += int(x.shape[0] * x.shape[1])

        def on_vision(module, args, kwargs):
            if self.reader.family == "qwen2_vl":
                grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
                self.images += int(grid.shape[0])
            else:
                pv = args[0] if args else kwargs["pixel_values"]
                self.images += int(pv.shape[0])

        tower = model.visual if self.reader.family == "qwen2_vl" else model.vision_tower
        self._handles = [self.reader.decoder.register_forward_pre_hook(on_decoder, with_kwargs=True),
                         tower.register_forward_pre_hook(on_vision, with_kwargs=True)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()


def _samples(task, layout, qimg, row):
    """(images, messages) of each of a query's K prompts, what ``encode_batch`` takes."""
    out = []
    for cand in row:
        messages, images = _prompts.build_messages(layout, task, qimg, None, cand)
        out.append((images, messages))
    return out


class HFBatched:
    """The K prompts of a query in one left-padded batch, one forward, ``logits_to_keep=1``."""

    method = "hf_batched"

    def __init__(self, reader, task, class_ids, layout):
        self.reader, self.task, self.class_ids, self.layout = reader, task, class_ids, layout

    @torch.no_grad()
    def __call__(self, qimgs, cands) -> torch.Tensor:
        out = []
        for q, row in zip(qimgs, cands):
            enc = self.reader.encode_batch(_samples(self.task, self.layout, q, row), padding_side="left")
            logits = self.reader.hf_model(**enc, use_cache=False, logits_to_keep=1).logits[:, -1]
            out.append(torch.log_softmax(logits[:, self.class_ids].float(), dim=-1))
        return torch.stack(out)


class ReferenceLoop:
    """The published code's structure: ``generate(max_new_tokens=8, use_cache=False)`` per chunk of
    5 ``paper`` prompts; class scores from the first step's full-vocabulary scores."""

    method = "reference_loop"
    layout = "paper"

    def __init__(self, reader, task, class_ids):
        self.reader, self.task, self.class_ids = reader, task, class_ids
        self.steps: list[int] = []  # decoding steps run, per prompt, in the last call
        self.check_logits = True  # compare scores with raw logits once

    @torch.no_grad()
    def __call__(self, qimgs, cands) -> torch.Tensor:
        proc, model = self.reader.processor, self.reader.hf_model
        self.steps = []
        out = []
        for q, row in zip(qimgs, cands):
            samples = _samples(self.task, self.layout, q, row)
            parts = []
            for c0 in range(0, len(samples), CHUNK):
                chunk = samples[c0:c0 + CHUNK]
                enc = self.reader.encode_batch(chunk, padding_side="left")
                gen = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, use_cache=False, do_sample=False,
                                     output_scores=True, output_logits=self.check_logits,
                                     return_dict_in_generate=True, pad_token_id=proc.pad_token_id)
                first = gen.scores[0]
                if self.check_logits:
                    if not torch.equal(first, gen.logits[0]):
                        raise AssertionError("reference_loop: generate's scores differ from the raw logits "
                                             "(a logits processor is active); class scores would be wrong")
                    self.check_logits = False
                self.steps.extend([len(gen.scores)] * len(chunk))
                parts.append(torch.log_softmax(first[:, self.class_ids].float(), dim=-1))
            out.append(torch.cat(parts))
        return torch.stack(out)


class Jomed:
    """``CandidateScorer(reader, task, layout).score`` on all B queries at once."""

    def __init__(self, reader, task, layout):
        self.method, self.layout = f"jomed_{layout}", layout
        self.scorer = CandidateScorer(reader, task, layout)

    @torch.no_grad()
    def __call__(self, qimgs, cands) -> torch.Tensor:
        return self.scorer.score(qimgs, None, cands)


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory of one call: CUDA allocator peak, or the process's peak resident set (VmHWM)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.linux = os.path.exists("/proc/self/clear_refs")
        try:
            self._libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self._libc = None

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        if self._libc is not None:
            self._libc.malloc_trim(0)
        if self.linux:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident set

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        if self.linux:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


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

    @property
    def name(self) -> str:
        return f"{self.method}/{self.layout}"

    @property
    def seconds(self) -> float:
        return statistics.median(self.times)

    @property
    def queries_per_s(self) -> float:
        return self.queries / self.seconds


def timed_call(fn: Callable[[], torch.Tensor], device: torch.device, memory: PeakMemory, name: str, clock: str):
    """``(output, seconds, peak bytes)`` of one call, inside an NVTX / profiler range ``name``.

    ``clock="wall"``: elapsed time; ``"cpu"``: the process's CPU time (``time.process_time``),
    which on a machine shared with other jobs leaves out the time this process waited for a core
    (with one torch thread it equals the wall time of an idle machine; CPU devices only)."""
    memory.reset()
    if device.type == "cuda":
        torch.cuda.synchronize()
    timer = time.process_time if clock == "cpu" else time.perf_counter
    start = timer()
    with stage(name):
        out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, timer() - start, memory.peak()


def check_agreement(runs: dict[str, Run], tolerance: float) -> dict[str, float]:
    """Per method, the max |Δ log p| against the other methods of its layout (over the queries
    both ran); raises ``AssertionError`` above ``tolerance``."""
    diffs = {name: 0.0 for name in runs}
    names = list(runs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ra, rb = runs[a], runs[b]
            if ra.layout != rb.layout:
                continue
            n = min(ra.queries, rb.queries)
            d = float((ra.scores[:n].double() - rb.scores[:n].double()).abs().max())
            if not math.isfinite(d) or d > tolerance:
                raise AssertionError(f"K={ra.K}: {a} and {b} disagree: max |Δ log p| = {d:.3g} > tolerance "
                                     f"{tolerance:g}; no speed is reported for methods that compute different things")
            diffs[a], diffs[b] = max(diffs[a], d), max(diffs[b], d)
    return diffs


def method_flops(run: Run, dec, vis, shapes: dict[str, list[list[F.Prompt]]], num_classes: int) -> F.Flops:
    """The FLOP model of ``run``'s method on the queries it ran."""
    prompts = [p for row in shapes[run.layout][:run.queries] for p in row[:run.K]]
    if run.method == "hf_batched":
        return F.hf_forward_flops(dec, vis, prompts)
    if run.method == "reference_loop":
        return F.generate_flops(dec, vis, prompts, run.steps)
    return F.shared_prefix_flops(dec, vis, prompts, num_classes)


def padding_factors(shapes: list[list[F.Prompt]]) -> dict[str, float]:
    """Slots computed / real tokens when rows are right-padded to the longest: the toolkit's
    suffixes if one chunk held all B·K rows (``main`` replaces it with what the scorer's
    length-aware chunks computed, from ``ScoreStats``, where a toolkit method ran) and
    ``hf_batched``'s whole prompts (one batch per query). The FLOP model counts real tokens only;
    this is the padding it leaves out."""
    suffixes = [p.suffix for row in shapes for p in row]
    whole = sum(len(row) * max(p.tokens for p in row) for row in shapes)
    return {"jomed_suffix": len(suffixes) * max(suffixes) / max(1, sum(suffixes)),
            "hf_batched": whole / sum(p.tokens for row in shapes for p in row)}


def fit_growth(points: list[tuple[int, float]]) -> dict[str, float]:
    """Least-squares ``t(K) = prefix + K × per_candidate`` over (K, seconds per query)."""
    if len({k for k, _ in points}) < 2:
        return {"prefix_s": float("nan"), "per_candidate_s": float("nan")}
    K = np.array([k for k, _ in points], dtype=float)
    t = np.array([s for _, s in points], dtype=float)
    slope, intercept = np.polyfit(K, t, 1)
    return {"prefix_s": float(intercept), "per_candidate_s": float(slope)}


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------
def make_record(run: Run, runs: dict[str, Run], diffs: dict[str, float], flops: dict[str, F.Flops]) -> dict:
    base = runs.get(f"hf_batched/{run.layout}")
    ref = runs.get("reference_loop/paper")
    per_query = {name: flops[name].total / runs[name].queries for name in runs}
    predicted = per_query[base.name] / per_query[run.name] if base else float("nan")
    measured = run.queries_per_s / base.queries_per_s if base else float("nan")
    record = {
        "method": run.method,
        "layout": run.layout,
        "K": run.K,
        "queries_per_s": run.queries_per_s,
        "candidates_per_s": run.queries_per_s * run.K,
        "speedup_vs_hf_batched": measured,
        "speedup_vs_reference_loop": run.queries_per_s / ref.queries_per_s if ref else float("nan"),
        "peak_mem_bytes": run.peak,
        "llm_tokens": run.llm_tokens,
        "vision_images": run.vision_images,
        "flop_model_speedup": predicted,
        "fraction_of_flop_bound": measured / predicted if base else float("nan"),
        "max_abs_logprob_diff": diffs[run.name],
    }
    assert tuple(record) == RECORD_FIELDS
    return record


def format_table(records: list[dict]) -> str:
    head = (f"{'K':>3} {'method':<19} {'layout':<12} {'q/s':>9} {'cand/s':>9} {'x hf':>6} {'x ref':>7} "
            f"{'flop x':>7} {'of bound':>8} {'peak MiB':>9} {'llm tok':>9} {'images':>7} {'max|Δ|':>8}")
    lines = [head, "-" * len(head)]
    for r in records:
        lines.append(
            f"{r['K']:>3} {r['method']:<19} {r['layout']:<12} {r['queries_per_s']:>9.3g} {r['candidates_per_s']:>9.3g} "
            f"{r['speedup_vs_hf_batched']:>6.2f} {r['speedup_vs_reference_loop']:>7.1f} {r['flop_model_speedup']:>7.2f} "
            f"{r['fraction_of_flop_bound']:>8.0%} {r['peak_mem_bytes'] / 2**20:>9.0f} {r['llm_tokens']:>9d} "
            f"{r['vision_images']:>7d} {r['max_abs_logprob_diff']:>8.1e}")
    return "\n".join(lines)


def format_markdown(records: list[dict]) -> str:
    """The records as a Markdown table (what the README's performance section shows)."""
    lines = [("| K | method | layout | queries/s | candidates/s | × hf_batched (same layout) | FLOP model × | "
             "of FLOP bound | × reference_loop | peak memory MiB | LLM tokens | images | max abs Δ log p |"),
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        lines.append(
            f"| {r['K']} | `{r['method']}` | {r['layout']} | {r['queries_per_s']:.3g} | {r['candidates_per_s']:.3g} | "
            f"{r['speedup_vs_hf_batched']:.2f} | {r['flop_model_speedup']:.2f} | {r['fraction_of_flop_bound']:.0%} | "
            f"{r['speedup_vs_reference_loop']:.1f} | {r['peak_mem_bytes'] / 2**20:.0f} | {r['llm_tokens']} | "
            f"{r['vision_images']} | {r['max_abs_logprob_diff']:.1e} |")
    return "\n".join(lines)


def write_plot(records: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in sorted({(r["method"], r["layout"]) for r in records}):
        rows = sorted((r for r in records if (r["method"], r["layout"]) == key), key=lambda r: r["K"])
        line, = ax.plot([r["K"] for r in rows], [r["queries_per_s"] for r in rows], marker="o",
                        label=f"{key[0]} ({key[1]})")
        if key[0] != "hf_batched" and all(math.isfinite(r["flop_model_speedup"]) for r in rows):
            # the FLOP-model bound: hf_batched's measured rate (same layout) x the predicted speed-up
            bound = [r["queries_per_s"] / r["fraction_of_flop_bound"] for r in rows]
            ax.plot([r["K"] for r in rows], bound, linestyle="--", color=line.get_color(), alpha=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("K (candidates per query)")
    ax.set_ylabel("queries / s")
    ax.set_title(title + "\n(dashed: FLOP-model bound, hf_batched's measured rate x predicted speed-up)", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_via(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("tiny", "small"), default="tiny", help="embedded reader built on the fly")
    p.add_argument("--arch", choices=("qwen2_vl", "pixtral"), default="qwen2_vl")
    p.add_argument("--reader", default=None, help="a reader checkpoint directory (instead of --size/--arch)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quantization", choices=("none", "nf4", "int8"), default="none")
    p.add_argument("--dtype", default=None, help="compute dtype (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--k", default="1,4,16,50", help="comma-separated K values")
    p.add_argument("--queries", type=int, default=None, help="B (default 4 tiny, 2 small)")
    p.add_argument("--reference-queries", type=int, default=None, help="queries reference_loop runs (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per method and K (default 3 tiny, 2 small)")
    p.add_argument("--reference-repeats", type=int, default=None, help="timed reference_loop calls (default 2 tiny, 1 small)")
    p.add_argument("--image-size", type=int, default=None, help="synthetic image side in px (default 32 tiny, 112 small)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time; cpu: process CPU time (a shared CPU machine, with --threads 1)")
    p.add_argument("--tolerance", type=float, default=None, help="agreement tolerance (default 1e-3 fp32, 5e-2 otherwise)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=os.path.join(RESULTS, "fusion_throughput.json"))
    p.add_argument("--plot", default=None, help="PNG path (default: the JSON's path with .png)")
    p.add_argument("--markdown", action="store_true", help="also print the table as Markdown (for the README)")
    p.add_argument("--profile", action="store_true", help="torch.profiler trace of one call per method at the largest K")
    args = p.parse_args(argv)
    return finish_args(p, args)


def finish_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    d_queries, d_ref_queries, d_repeats, d_ref_repeats, d_image = DEFAULTS[args.size]
    args.queries = d_queries if args.queries is None else args.queries
    args.reference_queries = d_ref_queries if args.reference_queries is None else args.reference_queries
    args.repeats = d_repeats if args.repeats is None else args.repeats
    args.reference_repeats = d_ref_repeats if args.reference_repeats is None else args.reference_repeats
    args.image_size = d_image if args.image_size is None else args.image_size
    try:
        args.k = sorted({int(k) for k in args.k.split(",") if k.strip()})
    except ValueError:
        parser.error(f"--k: expected comma-separated ints, got {args.k!r}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name, value in (("--queries", args.queries), ("--reference-queries", args.reference_queries),
                        ("--repeats", args.repeats), ("--reference-repeats", args.reference_repeats)):
        if value < 1:
            parser.error(f"{name}: expected an int >= 1, got {value}")
    if not args.k or args.k[0] < 1:
        parser.error(f"--k: expected K values >= 1, got {args.k}")
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        parser.error(f"--methods: expected a subset of {METHODS}, got {args.methods}")
    args.reference_queries = min(args.reference_queries, args.queries)
    args.plot = args.plot or os.path.splitext(args.json)[0] + ".png"
    if args.clock == "cpu" and (args.device != "cpu" or args.threads != 1):
        parser.error("--clock cpu: expected --device cpu and --threads 1 (CPU time of several threads or of "
                     f"a GPU run is not a duration), got --device {args.device} --threads {args.threads}")
    return args


def load(args):
    from jomed_fast.readers import load_reader, tiny

    path = args.reader
    if path is None:
        # keyed by the builder's version: a cache left by an older build is never mistaken for this one
        path = os.path.join(tempfile.gettempdir(), "jomed_fast_readers",
                            f"{args.arch}-{args.size}-build{tiny.BUILD_VERSION}")
        log(f"building the {args.size} {args.arch} reader in {path} (skipped when already built)")
        path = str(tiny.build(args.arch, path, size=args.size))
    quant = None if args.quantization == "none" else args.quantization
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reader = load_reader(path, quantization=quant, device=args.device, dtype=args.dtype)
    for p in reader.model.parameters():
        p.requires_grad_(False)
    reader.eval()
    return reader, path


def build_methods(reader, task, names: list[str]) -> list:
    class_ids = list(task.verbalizer(reader.tokenizer).class_token_ids)
    out = []
    for name in names:
        if name == "reference_loop":
            out.append(ReferenceLoop(reader, task, class_ids))
        elif name == "hf_batched":
            out.extend(HFBatched(reader, task, class_ids, layout) for layout in _prompts.LAYOUTS)
        else:
            out.append(Jomed(reader, task, name[len("jomed_"):]))
    return out


def run_k(K: int, methods: list, qimgs, cands, args, device, memory: PeakMemory, tolerance: float,
          warm: bool) -> tuple[dict[str, Run], dict[str, float]]:
    """All methods at one K: warm-up (first K), checked call (counted, compared), timed calls."""
    runs: dict[str, Run] = {}
    inputs = {}
    for m in methods:
        B = args.reference_queries if m.method == "reference_loop" else args.queries
        inputs[m] = (qimgs[:B], [row[:K] for row in cands[:B]])
        runs[f"{m.method}/{m.layout}"] = Run(m.method, m.layout, K, B)
    for m in methods:
        run = runs[f"{m.method}/{m.layout}"]
        if warm:
            log(f"  warm-up {run.name}")
            m(*inputs[m])
        with Counter(m.scorer.reader if isinstance(m, Jomed) else m.reader) as counter:
            scores, seconds, peak = timed_call(functools.partial(m, *inputs[m]), device, memory,
                                               f"bench.{run.method}.{run.layout}", args.clock)
        run.scores, run.peak = scores.detach().float().cpu(), peak
        run.times.append(seconds)
        if isinstance(m, Jomed):
            st = m.scorer.last_stats
            run.llm_tokens, run.vision_images = st.llm_tokens, st.vision_images
            run.suffix_padding = st.suffix_slots / max(1, st.suffix_tokens + st.class_tokens)
        else:
            run.llm_tokens, run.vision_images = counter.tokens, counter.images
        if isinstance(m, ReferenceLoop):
            run.steps = list(m.steps)
        log(f"  K={K} {run.name}: checked call {seconds:.3f} s")
    diffs = check_agreement(runs, tolerance)
    rounds = max(args.repeats, args.reference_repeats) - 1
    for r in range(rounds):
        for m in methods:
            run = runs[f"{m.method}/{m.layout}"]
            wanted = args.reference_repeats if m.method == "reference_loop" else args.repeats
            if len(run.times) >= wanted:
                continue
            _, seconds, peak = timed_call(functools.partial(m, *inputs[m]), device, memory,
                                          f"bench.{run.method}.{run.layout}", args.clock)
            run.times.append(seconds)
            run.peak = max(run.peak, peak)
        log(f"  K={K} timed round {r + 2}/{rounds + 1}")
    return runs, diffs


def profile(methods: list, K: int, qimgs, cands, args, path: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=activities, record_shapes=False) as prof:
        for m in methods:
            B = args.reference_queries if m.method == "reference_loop" else args.queries
            with stage(f"bench.{m.method}.{m.layout}"):
                m(qimgs[:B], [row[:K] for row in cands[:B]])
    prof.export_chrome_trace(path)
    log(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    log(f"wrote {path}")


def _json_safe(obj):
    """NaN / inf (a ratio whose baseline did not run: ``--methods``) as JSON null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from jomed_fast.tasks import get_task

    task = get_task(TASK)
    reader, path = load(args)
    tolerance = args.tolerance if args.tolerance is not None else (
        1e-3 if reader.compute_dtype == torch.float32 else 5e-2)
    log(f"reader {path} ({reader.family}, {args.quantization}, {reader.compute_dtype}) on {device}, "
        f"{torch.get_num_threads()} thread(s), load average {load_before[0]:.2f}")
    qimgs, cands = make_workload(args.queries, max(args.k), args.image_size, args.seed)
    methods = build_methods(reader, task, args.methods)
    dec, vis = F.decoder_shape(reader.config), F.vision_shape(reader.config)
    num_classes = task.verbalizer(reader.tokenizer).num_classes
    memory = PeakMemory(device)

    records, all_runs, extra_flops, load_by_k, padding = [], {}, {}, {}, {}
    for i, K in enumerate(args.k):
        log(f"K={K}: {args.queries} queries ({args.reference_queries} for reference_loop), "
            f"load average {os.getloadavg()[0]:.2f}")
        load_by_k[K] = os.getloadavg()[0]
        runs, diffs = run_k(K, methods, qimgs, cands, args, device, memory, tolerance, warm=i == 0)
        shapes = {layout: prompt_shapes(reader, task, layout, qimgs, [row[:K] for row in cands])
                  for layout in {r.layout for r in runs.values()}}
        flops = {name: method_flops(run, dec, vis, shapes, num_classes) for name, run in runs.items()}
        padding.update({f"{layout}@{K}": padding_factors(shape) for layout, shape in shapes.items()})
        for run in runs.values():  # the toolkit's chunks as run (length-aware), not one padded chunk
            if run.suffix_padding is not None:
                padding[f"{run.layout}@{K}"]["jomed_suffix"] = run.suffix_padding
        for name, run in runs.items():
            records.append(make_record(run, runs, diffs, flops))
            all_runs[f"{name}@{K}"] = run
            extra_flops[f"{name}@{K}"] = dataclasses.asdict(flops[name]) | {
                "per_query": flops[name].total / run.queries}
    wall = time.perf_counter() - t_start

    growth = {}
    for key in sorted({r.name for r in all_runs.values()}):
        growth[key] = fit_growth([(r.K, r.seconds / r.queries) for r in all_runs.values() if r.name == key])
    cross = []
    for K in args.k:
        sq, hp = all_runs.get(f"jomed_shared_query/shared_query@{K}"), all_runs.get(f"hf_batched/paper@{K}")
        if sq and hp:
            cross.append({"K": K, "measured": sq.queries_per_s / hp.queries_per_s,
                          "flop_model": extra_flops[f"hf_batched/paper@{K}"]["per_query"]
                          / extra_flops[f"jomed_shared_query/shared_query@{K}"]["per_query"]})

    title = (f"{reader.family} {args.size if args.reader is None else os.path.basename(path)} on {device}, "
             f"{torch.get_num_threads()} thread(s), B={args.queries}, {args.clock} clock")
    print(f"fusion throughput: {title}; median of repeats; load average {load_before[0]:.2f} -> "
          f"{os.getloadavg()[0]:.2f}; wall {wall:.0f} s")
    print(format_table(records))
    print("\ncost growth, seconds per query = prefix + K x per_candidate:")
    for key, g in growth.items():
        print(f"  {key:<34} {g['prefix_s']:>9.4f} + K x {g['per_candidate_s']:.4f}")
    for c in cross:
        print(f"K={c['K']:>3}: jomed_shared_query over hf_batched on the paper layout: {c['measured']:.2f}x "
              f"(FLOP model {c['flop_model']:.2f}x)")

    result = {
        "benchmark": "fusion_throughput",
        "config": {k: v for k, v in vars(args).items()} | {"reader_path": str(path), "task": TASK,
                                                           "tolerance": tolerance},
        "device": str(device),
        "reader_family": reader.family,
        "compute_dtype": str(reader.compute_dtype),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "load_average": {"start": load_before, "end": os.getloadavg(), "at_each_K": load_by_k},
        "wall_s": wall,
        "peak_mem_note": ("torch.cuda.max_memory_allocated per call" if device.type == "cuda" else
                          "process peak RSS (VmHWM reset via /proc/self/clear_refs after malloc_trim) per call, "
                          "weights included"),
        "records": records,
        "seconds": {k: r.times for k, r in all_runs.items()},
        "generate_steps": {k: r.steps for k, r in all_runs.items() if r.steps},
        "flops": extra_flops,
        "growth": growth,
        "padding": padding,
        "cross_layout": cross,
    }
    if args.markdown:
        print("\n" + format_markdown(records))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(_json_safe(result), f, indent=1, allow_nan=False)

    atomic_write_via(args.json, write)
    write_plot(records, args.plot, title)
    log(f"wrote {args.json} and {args.plot}")
    if args.profile:
        profile(methods, max(args.k), qimgs, cands, args, os.path.splitext(args.json)[0] + ".pt.trace.json")
    return result


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
