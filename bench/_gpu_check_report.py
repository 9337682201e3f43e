"""The GPU check's outputs: the plan table printed by every run, and the report of a CUDA run as
``<folder>/<device-slug>.json`` and ``<folder>/<device-slug>.md`` (Markdown tables), both written
atomically. ``results`` is the dict ``bench/gpu_check.py`` collects (``docs/gpu/README.md`` lists
its keys); :func:`markdown` reads only that dict, so a report can be rebuilt from its JSON."""

from __future__ import annotations

from pathlib import Path

from bench import _harness as harness
from bench._gpu_check_plan import DEVICES, GB, Step, device_slug, floor_seconds
from jomed_fast._files import atomic_write_via


def _num(v, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def plan_table(rows: list[dict]) -> str:
    """The plan as text: one line per step (GPU bytes against the budget, repeats, the estimate)."""
    cols = [
        harness.Column("step", 48, "name", align="<"),
        harness.Column("dtype", 9, "dtype", align="<"),
        harness.Column("dims", 40, lambda r: " ".join(f"{k}={v}" for k, v in r["dims"].items()), align="<"),
        harness.Column("GB", 7, lambda r: r["alloc_bytes"] / GB, ".2f"),
        harness.Column("fits", 5, lambda r: "yes" if r["fits"] else "NO"),
        harness.Column("reps", 5, "repeats"),
        harness.Column("est s", 7, "estimated_s", ".1f"),
    ]
    return harness.text_table(cols, rows)


PREDICTED_ON = ("L40", "H200")


def predicted(steps: list[Step], devices: tuple[str, ...] = PREDICTED_ON) -> list[dict]:
    """Per speed and index-search step, the roofline floor of the op and of its GPU baseline on each
    device and their ratio (the speed-up the floors allow): predictions from the byte and FLOP model,
    not measurements. A CPU baseline (the index search's) has no floor here: None."""
    rows = []
    for st in steps:
        if st.kind not in ("speed", "index_search"):
            continue
        row: dict = {"name": st.name, "op": st.op, "dims": dict(st.dims), "baseline": st.baseline}
        for name in devices:
            op = floor_seconds(st.moved_bytes, st.flops, DEVICES[name])
            base = floor_seconds(st.baseline_moved_bytes, st.baseline_flops, DEVICES[name])
            row[name] = {"op_us": op * 1e6, "baseline_us": base * 1e6 or None, "speedup": base / op or None}
        rows.append(row)
    return rows


def predicted_markdown(rows: list[dict], devices: tuple[str, ...] = PREDICTED_ON) -> str:
    """:func:`predicted` as a Markdown table, every figure marked as predicted."""
    head = ["step", "dims"]
    for name in devices:
        head += [f"{name} op us (predicted)", f"{name} baseline us (predicted)", f"{name} x (predicted)"]
    body = []
    for r in rows:
        cells = [r["name"], " ".join(f"{k}={v}" for k, v in r["dims"].items())]
        for name in devices:
            p = r[name]
            cells += [f"{p['op_us']:.2f}", _num(p["baseline_us"], ".2f"), _num(p["speedup"], ".1f")]
        body.append(cells)
    return harness.markdown_table(head, "ll" + "r" * (len(head) - 2), body)


def _bandwidth_sources(row: dict) -> list[str]:
    return [k[len("fraction_of_") : -len("_bandwidth")] for k in row if k.startswith("fraction_of_")]


def markdown(results: dict) -> str:
    """The report as Markdown: the device, then a table per step kind."""
    dev = results["device"]
    table = dev.get("table") or {}
    lines = [
        f"# GPU check: {dev['cuda_name']}",
        "",
        f"{dev['capability']}, {dev['memory_bytes'] / GB:.1f} GB; torch {dev['torch']}, CUDA {dev['cuda']}, "
        f"Triton {dev['triton']}; commit {results.get('commit', 'n/a')}; {results['wall_s']:.0f} s in all.",
        f"Peak bandwidth from the device table: {_num(table.get('bandwidth') and table['bandwidth'] / 1e9, '.0f')} GB/s"
        f" ({table.get('name', 'not in the table')}); measured device-to-device copy: "
        f"{dev['copy_bandwidth'] / 1e9:.0f} GB/s.",
        "",
        "## Correctness against float64",
        "",
    ]
    corr = results["correctness"]
    lines.append(
        harness.markdown_table(
            ["step", "max abs error (each output)", "atol", "rtol", "pass"],
            "llrrl",
            [
                [
                    r["name"],
                    "; ".join(f"{k} {v:.2e}" for k, v in r["max_abs_error"].items()),
                    f"{r['atol']:.1e}",
                    f"{r['rtol']:.1e}",
                    "pass" if r["passed"] else "**FAIL**",
                ]
                for r in corr
            ],
        )
    )
    passed = sum(r["passed"] for r in corr)
    lines += ["", f"{passed} of {len(corr)} passed.", "", "## Speed (median, CUDA events)", ""]
    speed = results["speed"]
    sources = _bandwidth_sources(speed[0]) if speed else []
    head = ["op", "dims", "baseline", "op ms", "baseline ms", "speed-up"]
    head += [f"op / {s} bw" for s in sources] + [f"baseline / {s} bw" for s in sources]
    body = []
    for r in speed:
        cells = [r["op"], " ".join(f"{k}={v}" for k, v in r["dims"].items()), r["baseline"]]
        cells += [f"{r['fast_ms']:.4f}", f"{r['baseline_ms']:.4f}", f"{r['speedup']:.1f}x"]
        cells += [f"{r[f'fraction_of_{s}_bandwidth']:.0%}" for s in sources]
        cells += [f"{r[f'baseline_fraction_of_{s}_bandwidth']:.0%}" for s in sources]
        body.append(cells)
    lines.append(harness.markdown_table(head, "lll" + "r" * (len(head) - 3), body))
    lines += [
        "",
        "The fractions: bytes of the analytic model / median time / the bandwidth (table peak, measured copy).",
    ]
    ix = results.get("index_search")
    if ix:
        dims = " ".join(f"{k}={v}" for k, v in ix["dims"].items())
        lines += [
            "",
            "## Index search (`jomed_fast.index.Index.search`, image head)",
            "",
            harness.markdown_table(
                ["dims", "CPU memory-mapped ms", "GPU-resident ms", "CPU / GPU", "max score diff"],
                "lrrrr",
                [
                    [
                        dims,
                        f"{ix['cpu_ms']:.2f}",
                        f"{ix['gpu_ms']:.3f}",
                        f"{ix['ratio_cpu_over_gpu']:.0f}x",
                        f"{ix['max_abs_score_diff']:.1e}",
                    ]
                ],
            ),
            "",
            f"CPU side on {ix['cpu_threads']} torch threads.",
        ]
    fu = results.get("fusion_throughput")
    if fu:
        lines += ["", f"## Candidate scoring (`{fu['command']}`)", ""]
        if "error" in fu:
            lines.append(f"Did not complete: {fu['error'].splitlines()[-1] if fu['error'] else 'no message'}")
        else:
            lines.append(
                harness.markdown_table(
                    ["K", "method", "layout", "queries/s", "x hf_batched", "x reference_loop", "peak MiB"],
                    "rllrrrr",
                    [
                        [
                            str(r["K"]),
                            r["method"],
                            r["layout"],
                            _num(r["queries_per_s"], ".3g"),
                            _num(r["speedup_vs_hf_batched"], ".2f"),
                            _num(r["speedup_vs_reference_loop"], ".1f"),
                            _num(r["peak_mem_bytes"] and r["peak_mem_bytes"] / (1 << 20), ".0f"),
                        ]
                        for r in fu["records"]
                    ],
                )
            )
    mp = results.get("memory_planner")
    if mp:
        lines += ["", "## Memory planner against `torch.cuda.max_memory_allocated`", ""]
        lines.append(
            harness.markdown_table(
                ["step", "tokens", "rows", "predicted MB", "measured MB", "predicted / measured", "in bound"],
                "lrlrrrl",
                [
                    [
                        r["step"],
                        str(r["tokens"]),
                        r["rows"],
                        f"{r['predicted_bytes'] / 1e6:.1f}",
                        f"{r['measured_bytes'] / 1e6:.1f}",
                        f"{r['ratio']:.2f}",
                        "yes" if r["within_cpu_test_bound"] else "no",
                    ]
                    for r in mp["rows"]
                ],
            )
        )
        lo, hi = mp["bound"]
        lines += ["", f"Bound: the CPU test's, predicted between {lo:.0%} and {hi:.0%} of measured."]
    if results.get("errors"):
        lines += ["", "## Steps that raised", ""]
        lines += [f"- `{e['name']}`: {e['error']}" for e in results["errors"]]
    return "\n".join(lines) + "\n"


def write_report(results: dict, folder: str | Path) -> tuple[Path, Path]:
    """``<folder>/<slug>.json`` and ``<folder>/<slug>.md`` for ``results``, each written atomically."""
    slug = device_slug(results["device"]["cuda_name"])
    folder = Path(folder)
    json_path, md_path = folder / f"{slug}.json", folder / f"{slug}.md"
    text = markdown(results)  # before any write: a results dict it cannot read leaves no file
    harness.write_json(json_path, results)
    atomic_write_via(md_path, lambda tmp: Path(tmp).write_text(text))
    return json_path, md_path
