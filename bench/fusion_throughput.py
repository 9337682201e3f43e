r"""Candidate scoring throughput: the toolkit against what users would otherwise run, side by side.

    python bench/fusion_throughput.py                     # tiny reader, CPU, synthetic task (~1 min)
    python bench/fusion_throughput.py --size small        # the real models' proportions (docs/benchmarks.md)
    python bench/fusion_throughput.py --size small --clock cpu --markdown   # on a shared CPU machine
    python bench/fusion_throughput.py --reader PATH --device cuda --quantization nf4 [--profile]

Class log-probabilities ``[B, K, C]`` of B queries × K retrieved candidates, from the raw images and
captions, by each method of ``bench/_fusion.py`` on one reader: ``reference_loop`` (the published
code's ``generate`` loop), ``hf_batched`` (one padded forward per query, both layouts),
``jomed_paper`` / ``jomed_shared_query`` (``CandidateScorer``; the two layouts are two prompts, so a
cross-layout ratio is a speed-up only for a reader trained on ``shared_query``). At each K the methods' first calls
are compared (above the tolerance the run stops before reporting any speed), then timed
round-robin: ``queries_per_s = B / median time``. Writes a table (stdout), records with exactly
``RECORD_FIELDS`` and the run's details (``bench/results/fusion_throughput.json``), a PNG beside
it; ``bench/README.md`` explains the defaults, every field and how to read them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import _harness as H  # noqa: E402
from bench._fusion import (  # noqa: E402,F401
    MAX_NEW_TOKENS,
    add_reader_args,
    build_methods,
    check_agreement,
    counted_call,
    load,
    make_workload,
    method_flops,
    padding_factors,
    prompt_shapes,
)
from bench._fusion_report import RECORD_FIELDS, Run, make_record, print_report, summarize, write_plot  # noqa: E402,F401
from jomed_fast.scoring import flops as F  # noqa: E402
from jomed_fast.tasks import build_verbalizer, get_task  # noqa: E402

METHODS = ("reference_loop", "hf_batched", "jomed_paper", "jomed_shared_query")
TASK = "synthetic"
# per --size: (queries, reference queries, repeats, reference repeats, image size in px)
DEFAULTS = {"tiny": (4, 1, 3, 2, 32), "small": (2, 1, 2, 1, 112)}


def parse_args(argv=None):
    p = H.arguments(__doc__)
    add_reader_args(p)
    p.add_argument("--k", default="1,4,16,50", help="comma-separated K values")
    p.add_argument("--queries", type=int, default=None, help="B (default 4 tiny, 2 small)")
    p.add_argument("--reference-queries", type=int, default=None, help="queries reference_loop runs (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per method and K (default 3 tiny, 2 small)")
    p.add_argument(
        "--reference-repeats", type=int, default=None, help="timed reference_loop calls (default 2 tiny, 1 small)"
    )
    p.add_argument(
        "--image-size", type=int, default=None, help="synthetic image side in px (default 32 tiny, 112 small)"
    )
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument(
        "--clock",
        choices=tuple(H.CLOCKS),
        default="wall",
        help="wall: elapsed time; cpu: process CPU time (a shared CPU machine, with --threads 1)",
    )
    p.add_argument(
        "--tolerance", type=float, default=None, help="agreement tolerance (default 1e-3 fp32, 5e-2 otherwise)"
    )
    H.add_common(p, "fusion_throughput.json", seed=0)
    p.add_argument("--plot", default=None, help="PNG path (default: the JSON's path with .png)")
    p.add_argument("--markdown", action="store_true", help="also print the table as Markdown (for the README)")
    p.add_argument(
        "--profile", action="store_true", help="torch.profiler trace of one call per method at the largest K"
    )
    args = p.parse_args(argv)
    for name, default in zip(
        ("queries", "reference_queries", "repeats", "reference_repeats", "image_size"), DEFAULTS[args.size]
    ):
        setattr(args, name, default if getattr(args, name) is None else getattr(args, name))
    try:
        args.k = sorted({int(k) for k in args.k.split(",") if k.strip()})
    except ValueError:
        p.error(f"--k: expected comma-separated ints, got {args.k!r}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    H.require_at_least(p, args, 1, "queries", "reference_queries", "repeats", "reference_repeats")
    if not args.k or args.k[0] < 1:
        p.error(f"--k: expected K values >= 1, got {args.k}")
    if not args.methods or any(m not in METHODS for m in args.methods):
        p.error(f"--methods: expected a subset of {METHODS}, got {args.methods}")
    args.reference_queries = min(args.reference_queries, args.queries)
    args.plot = args.plot or os.path.splitext(args.json)[0] + ".png"
    if args.clock == "cpu" and (args.device != "cpu" or args.threads != 1):
        p.error(
            "--clock cpu: expected --device cpu and --threads 1 (CPU time of several threads or of "
            f"a GPU run is not a duration), got --device {args.device} --threads {args.threads}"
        )
    return args


def inputs_of(m, qimgs, cands, args, K: int):
    """What ``m`` runs on at K: the first B queries (``--reference-queries`` for reference_loop)."""
    B = args.reference_queries if m.method == "reference_loop" else args.queries
    return qimgs[:B], [row[:K] for row in cands[:B]]


def checked_call(m, run: Run, fn, warm: bool, device, memory: H.PeakMemory, clock: str) -> None:
    """The first timed call of ``m`` (after an untimed one where ``warm``): scores, counts, peak."""
    if warm:
        H.log(f"  warm-up {run.name}")
        fn()
    scores, t, counts = counted_call(
        m, fn, device=device, clock=clock, memory=memory, name=f"bench.{run.method}.{run.layout}"
    )
    run.scores, run.peak, run.times = scores.detach().float().cpu(), t.peak_bytes, [t.seconds]
    vars(run).update(counts)  # llm_tokens, vision_images, steps, suffix_padding
    H.log(f"  K={run.K} {run.name}: checked call {t.seconds:.3f} s")


def run_k(
    K: int, methods: list, qimgs, cands, args, device, memory: H.PeakMemory, tolerance: float, warm: bool
) -> tuple[dict[str, Run], dict[str, float]]:
    """All methods at one K: warm-up (first K), checked call (counted, compared), timed calls."""
    runs, fns, wanted = {}, {}, {}
    for m in methods:
        q, rows = inputs_of(m, qimgs, cands, args, K)
        run = runs.setdefault(f"{m.method}/{m.layout}", Run(m.method, m.layout, K, len(q)))
        fns[run.name] = functools.partial(m, q, rows)
        wanted[run.name] = (args.reference_repeats if m.method == "reference_loop" else args.repeats) - 1
    for m, (name, fn) in zip(methods, fns.items()):
        checked_call(m, runs[name], fn, warm, device, memory, args.clock)
    diffs = check_agreement(runs, tolerance)
    timings = H.round_robin(
        fns,
        wanted,
        warmup=0,
        device=device,
        clock=args.clock,
        memory=memory,
        ranges={n: "bench." + n.replace("/", ".") for n in fns},
        on_round=lambda r, n: H.log(f"  K={K} timed round {r + 2}/{n + 1}"),
    )
    for name, ts in timings.items():
        runs[name].times += [t.seconds for t in ts]
        runs[name].peak = max([runs[name].peak, *(t.peak_bytes for t in ts)])
    return runs, diffs


def measure(args, reader, task, methods, qimgs, cands, device, tolerance: float) -> dict:
    """Every K: the runs, their records and FLOPs, the load average and the padding factors."""
    dec, vis = F.decoder_shape(reader.config), F.vision_shape(reader.config)
    num_classes = build_verbalizer(task, reader.tokenizer).num_classes
    memory = H.PeakMemory(device)
    out = {"records": [], "runs": {}, "flops": {}, "load_by_k": {}, "padding": {}}
    for i, K in enumerate(args.k):
        H.log(
            f"K={K}: {args.queries} queries ({args.reference_queries} for reference_loop), "
            f"load average {os.getloadavg()[0]:.2f}"
        )
        out["load_by_k"][K] = os.getloadavg()[0]
        runs, diffs = run_k(K, methods, qimgs, cands, args, device, memory, tolerance, warm=i == 0)
        shapes = {
            layout: prompt_shapes(reader, task, layout, qimgs, [row[:K] for row in cands])
            for layout in {r.layout for r in runs.values()}
        }
        flops = {name: method_flops(run, dec, vis, shapes, num_classes) for name, run in runs.items()}
        out["padding"].update({f"{layout}@{K}": padding_factors(shape) for layout, shape in shapes.items()})
        for run in runs.values():  # the toolkit's chunks as run (length-aware), not one padded chunk
            if run.suffix_padding is not None:
                out["padding"][f"{run.layout}@{K}"]["jomed_suffix"] = run.suffix_padding
        for name, run in runs.items():
            out["records"].append(make_record(run, runs, diffs, flops))
            out["runs"][f"{name}@{K}"] = run
            out["flops"][f"{name}@{K}"] = dataclasses.asdict(flops[name]) | {
                "per_query": flops[name].total / run.queries
            }
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start, load_before = time.perf_counter(), os.getloadavg()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device, task = torch.device(args.device), get_task(TASK)
    reader, path = load(args)
    tolerance = (
        args.tolerance if args.tolerance is not None else (1e-3 if reader.compute_dtype == torch.float32 else 5e-2)
    )
    H.log(
        f"reader {path} ({reader.family}, {args.quantization}, {reader.compute_dtype}) on {device}, "
        f"{torch.get_num_threads()} thread(s), load average {load_before[0]:.2f}"
    )
    qimgs, cands = make_workload(args.queries, max(args.k), args.image_size, args.seed)
    methods = build_methods(reader, task, args.methods)
    m = measure(args, reader, task, methods, qimgs, cands, device, tolerance)
    wall = time.perf_counter() - t_start
    growth, cross = summarize(args.k, m["runs"], m["flops"])
    title = (
        f"{reader.family} {args.size if args.reader is None else os.path.basename(path)} on {device}, "
        f"{torch.get_num_threads()} thread(s), B={args.queries}, {args.clock} clock"
    )
    print(
        f"fusion throughput: {title}; median of repeats; load average {load_before[0]:.2f} -> "
        f"{os.getloadavg()[0]:.2f}; wall {wall:.0f} s"
    )
    print_report(m["records"], growth, cross, markdown=args.markdown)

    result = {
        "benchmark": "fusion_throughput",
        "config": dict(vars(args)) | {"reader_path": str(path), "task": TASK, "tolerance": tolerance},
        "device": str(device),
        "reader_family": reader.family,
        "compute_dtype": str(reader.compute_dtype),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "load_average": {"start": load_before, "end": os.getloadavg(), "at_each_K": m["load_by_k"]},
        "wall_s": wall,
        "peak_mem_note": (
            "torch.cuda.max_memory_allocated per call"
            if device.type == "cuda"
            else "process peak RSS (VmHWM reset via /proc/self/clear_refs after malloc_trim) per call, weights included"
        ),
        "records": m["records"],
        "seconds": {k: r.times for k, r in m["runs"].items()},
        "generate_steps": {k: r.steps for k, r in m["runs"].items() if r.steps},
        "flops": m["flops"],
        "growth": growth,
        "padding": m["padding"],
        "cross_layout": cross,
    }
    H.write_json(args.json, result)
    write_plot(m["records"], args.plot, title)
    H.log(f"wrote {args.json} and {args.plot}")
    if args.profile:
        K = max(args.k)
        calls = {
            f"bench.{x.method}.{x.layout}": functools.partial(x, *inputs_of(x, qimgs, cands, args, K)) for x in methods
        }
        H.profile(calls, os.path.splitext(args.json)[0] + ".pt.trace.json")
    return result


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
