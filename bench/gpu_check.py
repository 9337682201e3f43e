"""One-command GPU validation: correctness, speed, index search, scoring throughput and the memory planner.

    python bench/gpu_check.py                  # on a GPU (make gpu-check): planned for 8 minutes
    python bench/gpu_check.py --dry-run        # anywhere: plan and check every step, no CUDA call

Steps, in order (``bench/_gpu_check_plan.py`` plans each; ``docs/gpu/README.md`` describes the output):

1. every op of ``jomed_fast.ops`` in fp32 / fp16 / bf16 against its float64 reference at the
   paper's shapes (Qwen2-VL 7B head, C in {2, 15}, K = 50, a 2.1M x 768 index), forward and
   backward, with the CPU tests' tolerances;
2. each kernel against its torch baseline (and faiss ``GpuIndexFlatIP`` where faiss has GPU
   support), with the fraction of the bandwidth roofline (the device table's peak and a measured
   device-to-device copy); ``jomed_fast.index`` search on a GPU-resident index against the CPU
   memory-mapped one;
3. ``bench/fusion_throughput.py --size small --device cuda`` (bf16) at K in {4, 50};
4. the memory planner against ``torch.cuda.max_memory_allocated`` for a stage-1 and a stage-2 step.

A CUDA run writes ``docs/gpu/<device-slug>.json`` and ``.md`` (``--report-dir``). ``--dry-run``
(also taken when torch sees no CUDA device) prints the plan (shapes, dtypes, the bytes each step
allocates against ``--memory-gb``, repeats, the roofline estimate of its time), writes it to
``--out`` and exits 2 with one line naming the first step that does not fit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import _gpu_check_plan as P  # noqa: E402
from bench import _harness as harness  # noqa: E402
from bench._gpu_check_report import plan_table, predicted, predicted_markdown, write_report  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRY_RUN_MEMORY_GB = 48.0  # the L40's, the target GPU's (DESIGN.md)


def parse_args(argv=None):
    p = harness.arguments(__doc__)
    p.add_argument("--dry-run", action="store_true", help="plan and check every step; no CUDA call")
    p.add_argument(
        "--memory-gb",
        type=float,
        default=None,
        help="device memory budget in GB (default: a dry run an L40's 48, a CUDA run its GPU's memory)",
    )
    p.add_argument(
        "--device-name",
        default="L40",
        choices=sorted(P.DEVICES),
        help="the device table entry a dry run estimates times on (a CUDA run uses its own GPU)",
    )
    p.add_argument("--index-rows", type=int, default=P.Shapes.N, help="N of the top-k steps (default the paper's)")
    p.add_argument("--search-rows", type=int, default=P.Shapes.search_N, help="N of the index-search step")
    p.add_argument("--repeats", type=int, default=P.Shapes.speed_repeats, help="timed calls per speed figure")
    p.add_argument("--out", default=os.path.join(harness.RESULTS, "gpu_check_plan.json"), help="where the plan goes")
    p.add_argument("--report-dir", default=os.path.join(ROOT, "docs", "gpu"), help="where a CUDA run's report goes")
    args = p.parse_args(argv)
    harness.require_at_least(p, args, 1, "index_rows", "search_rows", "repeats")
    if args.memory_gb is not None and not args.memory_gb > 0:
        p.error(f"--memory-gb: expected a number > 0, got {args.memory_gb}")
    return args


def faiss_has_gpu() -> bool:
    """Whether faiss is importable with GPU support: a build holding ``GpuIndexFlatIP`` (asked of the
    module, not the CUDA runtime, so a dry run makes no CUDA call)."""
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "GpuIndexFlatIP")


def make_plan(args, device: P.Device, faiss_gpu: bool) -> tuple[P.Shapes, list[P.Step], dict]:
    shapes = P.Shapes(N=args.index_rows, search_N=args.search_rows, speed_repeats=args.repeats)
    steps = P.plan_steps(shapes, faiss_gpu=faiss_gpu)
    budget = P.budget_bytes(args.memory_gb)
    rows = [st.describe(device, budget) for st in steps]
    plan = {
        "memory_gb": args.memory_gb,
        "budget_bytes": budget,
        "estimated_on": device.name,
        "estimated_total_s": sum(r["estimated_s"] for r in rows),
        "time_limit_s": P.TIME_LIMIT_S,
        "faiss_gpu": faiss_gpu,
        "steps": rows,
        "predicted": predicted(steps),
    }
    return shapes, steps, plan


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() or None


def run_on_gpu(shapes: P.Shapes, steps: list[P.Step], plan: dict) -> dict:
    """Every step on the GPU, in the plan's order; the results dict of the report."""
    import torch

    from bench import _gpu_check_cuda as G
    from bench._gpu_check_correctness import check
    from bench._gpu_check_memory import memory_planner

    start = time.perf_counter()
    info = G.device_info()
    table = P.lookup_device(info["cuda_name"])
    info["table"] = None if table is None else {"name": table.name, "bandwidth": table.bandwidth, "flops": table.flops}
    info["copy_bandwidth"] = G.copy_bandwidth()
    bandwidths = {"measured_copy": info["copy_bandwidth"]}
    if table is not None:
        bandwidths = {"table": table.bandwidth, **bandwidths}
    results: dict = {"device": info, "commit": _commit(), "plan": plan, "correctness": [], "speed": [], "errors": []}

    def run(st: P.Step) -> None:
        if st.kind == "correctness":
            row = check(st, shapes, "cuda")
            results["correctness"].append(row)
            harness.log(f"  {'pass' if row['passed'] else 'FAIL'} {row['max_abs_error']}")
        elif st.kind == "speed":
            results["speed"].append(G.speed(st, bandwidths))
        elif st.kind == "index_search":
            results["index_search"] = G.index_search(st)
        elif st.kind == "fusion":
            results["fusion_throughput"] = G.fusion_throughput(st)
        elif st.kind == "memory_planner":
            results["memory_planner"] = memory_planner(st, shapes)

    for st in steps:
        harness.log(f"{st.name} ...")
        try:
            run(st)
        except Exception as e:  # one step's failure is reported beside the others' results, not lost with them
            results["errors"].append({"name": st.name, "error": f"{type(e).__name__}: {e}"})
            harness.log(f"  raised {type(e).__name__}: {e}")
        torch.cuda.empty_cache()
    results["passed"] = (
        not results["errors"]
        and all(r["passed"] for r in results["correctness"])
        and results.get("index_search", {}).get("scores_agree", True)
        and "error" not in results.get("fusion_throughput", {})
    )
    results["wall_s"] = time.perf_counter() - start
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    dry = args.dry_run
    if not dry:
        import torch

        dry = not torch.cuda.is_available()
        if dry:
            harness.log("torch sees no CUDA device: a dry run")
    faiss_gpu = faiss_has_gpu()
    if dry:
        device = P.DEVICES[args.device_name]
        args.memory_gb = DRY_RUN_MEMORY_GB if args.memory_gb is None else args.memory_gb
    else:
        import torch

        device = P.lookup_device(torch.cuda.get_device_name(0)) or P.DEVICES["L40"]
        if args.memory_gb is None:
            args.memory_gb = torch.cuda.get_device_properties(0).total_memory / P.GB
    shapes, steps, plan = make_plan(args, device, faiss_gpu)
    print(plan_table(plan["steps"]))
    print(
        f"\n{len(steps)} steps; estimated {plan['estimated_total_s']:.0f} s on {device.name} "
        f"(roofline floors + stated allowances); budget {plan['budget_bytes'] / P.GB:.2f} GB of --memory-gb {args.memory_gb:g}"
    )
    print("\nroofline floors (predicted, not measured):\n" + predicted_markdown(plan["predicted"]))
    problem = P.check_budget(steps, args.memory_gb, device)
    plan["problem"] = problem
    harness.write_json(args.out, plan)
    print(f"wrote {args.out}")
    if problem:
        print(f"gpu_check: {problem}", file=sys.stderr)
        return 2
    if dry:
        return 0
    results = run_on_gpu(shapes, steps, plan)
    json_path, md_path = write_report(results, args.report_dir)
    print(f"wrote {json_path} and {md_path}")
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
