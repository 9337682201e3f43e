"""The GPU check's measured steps (CUDA only): kernel speed, the index search, and the fusion
benchmark.

* :func:`event_times`: CUDA-event timing, round-robin between the compared functions, after
  warm-up calls; a figure is the median.
* :func:`copy_bandwidth`: a device-to-device copy's bandwidth (read + write bytes / time), reported
  beside the device table's peak.
* :func:`speed`: one op against its torch baseline (and faiss ``GpuIndexFlatIP`` for the top-k),
  with the fraction of the bandwidth roofline each reached.
* :func:`index_search`: ``Index.search`` on a GPU-resident index against the CPU memory-mapped one.
* :func:`fusion_throughput`: ``bench/fusion_throughput.py --size small --device cuda`` as a subprocess.
(The memory planner's step: ``_gpu_check_memory``.)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench._gpu_check_correctness import random_unit_rows
from bench._gpu_check_plan import TOPK_SCORE_TOLERANCE, Step, bandwidth_fraction
from jomed_fast import ops

BENCH = Path(__file__).resolve().parent
FUSION_TIMEOUT_S = 240  # the plan allows it 150 s; past this the check would overrun its 8 minutes


def event_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of ``repeats`` calls of each function, timed with CUDA events round-robin after
    ``warmup`` untimed rounds (so clock and thermal drift fall on all of them alike)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    torch.cuda.synchronize()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out[name].append(start.elapsed_time(end) / 1e3)
    return out


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy of ``nbytes``: it reads and writes each byte once."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = event_times({"copy": lambda: dst.copy_(src)}, repeats)["copy"]
    return 2 * nbytes / statistics.median(t)


def _speed_row(step: Step, fast_s: list[float], base_s: list[float], bandwidths: dict[str, float], clock: str) -> dict:
    fast, base = statistics.median(fast_s), statistics.median(base_s)
    row = {
        "name": step.name,
        "op": step.op,
        "dtype": step.dtype,
        "dims": dict(step.dims),
        "baseline": step.baseline,
        "fast_ms": fast * 1e3,
        "baseline_ms": base * 1e3,
        "speedup": base / fast,
        "moved_bytes": step.moved_bytes,
        "baseline_moved_bytes": step.baseline_moved_bytes,
        "repeats": len(fast_s),
        "clock": clock,
    }
    for source, bw in bandwidths.items():
        row[f"fraction_of_{source}_bandwidth"] = bandwidth_fraction(step.moved_bytes, fast, bw)
        row[f"baseline_fraction_of_{source}_bandwidth"] = bandwidth_fraction(step.baseline_moved_bytes, base, bw)
    return row


def _inputs(step: Step, gen, device):
    d = step.dims
    if step.name == "speed/head_class_log_softmax":
        hidden = torch.randn((d["N"], d["H"]), generator=gen, device=device, dtype=torch.bfloat16)
        weight = torch.randn((d["V"], d["H"]), generator=gen, device=device, dtype=torch.bfloat16).mul_(d["H"] ** -0.5)
        ids = torch.randperm(d["V"], generator=gen, device=device)[: d["C"]]
        return (
            lambda: ops.head_class_log_softmax(hidden, weight, ids),
            lambda: torch.log_softmax((hidden @ weight.T)[:, ids].float(), dim=-1),
        )
    if step.name == "speed/class_log_softmax":
        logits = torch.randn((d["R"], d["V"]), generator=gen, device=device, dtype=torch.bfloat16)
        ids = torch.randperm(d["V"], generator=gen, device=device)[: d["C"]]

        def renormalised():
            full = torch.log_softmax(logits.float(), dim=-1)[:, ids]
            return full - torch.logsumexp(full, dim=-1, keepdim=True)

        return lambda: ops.class_log_softmax(logits, ids), renormalised
    if step.name == "speed/retrieval_kl_loss":
        s = torch.randn((d["B"], d["K"]), generator=gen, device=device).requires_grad_(True)
        r = torch.randn((d["B"], d["K"]), generator=gen, device=device) * 3

        def fused():
            ops.retrieval_kl_loss(s, r, 1.0, 0.1).backward()

        def composed():
            p = torch.softmax(r / 0.1, dim=-1)
            torch.nn.functional.kl_div(torch.log_softmax(s, dim=-1), p, reduction="batchmean").backward()

        return fused, composed
    if step.name == "speed/fuse_candidates":
        lp = torch.log_softmax(torch.randn((d["B"], d["K"], d["C"]), generator=gen, device=device), -1)
        s = torch.randn((d["B"], d["K"]), generator=gen, device=device)
        return (
            lambda: ops.fuse_candidates(lp, s, 1.0),
            lambda: (lp.exp() * torch.softmax(s, dim=-1)[:, :, None]).sum(dim=1),
        )
    raise ValueError(f"step: expected a speed step of an op, got {step.name!r}")


def speed(step: Step, bandwidths: dict[str, float]) -> dict:
    """One speed step on the GPU: the op and its baseline timed side by side (CUDA events)."""
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    if step.op != "topk_similarity":
        fast, base = _inputs(step, gen, device)
        t = event_times({"fast": fast, "baseline": base}, step.repeats)
        return _speed_row(step, t["fast"], t["baseline"], bandwidths, "cuda events")
    d = step.dims
    index = random_unit_rows(d["N"], d["D"], gen, device, torch.float16)
    queries = random_unit_rows(d["Q"], d["D"], gen, device, torch.float32)

    def search():
        return ops.topk_similarity(queries, index, d["k"])

    if not step.name.endswith("/faiss"):
        t = event_times(
            {"fast": search, "baseline": lambda: torch.topk(queries.half() @ index.T, d["k"], dim=-1)}, step.repeats
        )
        return _speed_row(step, t["fast"], t["baseline"], bandwidths, "cuda events")
    return _faiss_speed(step, search, index, queries, bandwidths)


def _faiss_speed(step: Step, fast, index: torch.Tensor, queries: torch.Tensor, bandwidths: dict[str, float]) -> dict:
    """faiss runs on its own stream, so both sides are timed on the host clock, synchronised."""
    import faiss

    d = step.dims
    res = faiss.StandardGpuResources()
    flat = faiss.GpuIndexFlatIP(res, d["D"])
    for n0 in range(0, d["N"], 1 << 18):
        flat.add(index[n0 : n0 + (1 << 18)].float().cpu().numpy())
    q_np = queries.cpu().numpy()
    times: dict[str, list[float]] = {"fast": [], "baseline": []}
    calls = {"fast": fast, "baseline": lambda: flat.search(q_np, d["k"])}
    for r in range(1 + step.repeats):
        for name, fn in calls.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    scores = flat.search(q_np, d["k"])[0]
    row = _speed_row(step, times["fast"], times["baseline"], bandwidths, "host clock, synchronised")
    row["max_abs_score_diff_vs_faiss"] = float(np.abs(fast()[0].cpu().numpy() - scores).max())
    return row


def _write_index(folder: Path, n: int, d: int, seed: int = 0) -> None:
    """An index folder ``jomed_fast.index.Index.open`` reads (verify=False): both fp16 heads of n
    random unit rows, an empty records file and a manifest without checksums."""
    from jomed_fast.index import FILES, HEADS

    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in HEADS.values():
        rows = np.lib.format.open_memmap(folder / name, mode="w+", dtype=np.float16, shape=(n, d))
        rows[:] = random_unit_rows(n, d, gen, "cpu", torch.float16).numpy()
        rows.flush()
        del rows
    for name in FILES:
        if not (folder / name).exists():
            (folder / name).write_text("")
    manifest = {"count": n, "dim": d, "dtype": "float16", "encoder_fingerprint": "gpu-check random rows", "sha256": {}}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def index_search(step: Step) -> dict:
    """``Index.search`` on the GPU (``Index.to("cuda")``) against the CPU memory-mapped heads."""
    from jomed_fast.index import Index

    d = step.dims
    with tempfile.TemporaryDirectory() as tmp:
        _write_index(Path(tmp), d["N"], d["D"])
        on_cpu = Index.open(tmp, verify=False)
        on_gpu = Index.open(tmp, verify=False).to("cuda")
        queries = random_unit_rows(d["Q"], d["D"], torch.Generator().manual_seed(1), "cpu", torch.float32)
        queries_gpu = queries.cuda()
        cpu_times = []
        for r in range(1 + step.extra["cpu_repeats"]):
            t0 = time.perf_counter()
            cpu_scores, _ = on_cpu.search(queries, d["k"], head="image")
            if r:
                cpu_times.append(time.perf_counter() - t0)
        gpu_times = event_times({"gpu": lambda: on_gpu.search(queries_gpu, d["k"], head="image")}, step.repeats)["gpu"]
        gpu_scores, _ = on_gpu.search(queries_gpu, d["k"], head="image")
    diff = float((gpu_scores.cpu() - cpu_scores).abs().max())
    cpu_s, gpu_s = statistics.median(cpu_times), statistics.median(gpu_times)
    return {
        "name": step.name,
        "dims": dict(d),
        "cpu_threads": torch.get_num_threads(),
        "cpu_ms": cpu_s * 1e3,
        "gpu_ms": gpu_s * 1e3,
        "ratio_cpu_over_gpu": cpu_s / gpu_s,
        "max_abs_score_diff": diff,
        "scores_agree": diff <= TOPK_SCORE_TOLERANCE[0],
        "cpu_repeats": len(cpu_times),
        "gpu_repeats": len(gpu_times),
    }


def fusion_throughput(step: Step) -> dict:
    """bench/fusion_throughput.py at K in the step's values on CUDA; its headline numbers."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fusion_throughput.json"
        ks = ",".join(str(k) for k in step.extra["k_values"])
        cmd = [sys.executable, str(BENCH / "fusion_throughput.py"), "--size", "small", "--device", "cuda"]
        cmd += ["--k", ks, "--json", str(out), "--plot", str(Path(tmp) / "fusion.png")]
        t0 = time.perf_counter()
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=FUSION_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"name": step.name, "command": " ".join(cmd[1:]), "error": f"timed out after {FUSION_TIMEOUT_S} s"}
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            return {"name": step.name, "command": " ".join(cmd[1:]), "error": res.stderr.strip()[-2000:]}
        result = json.loads(out.read_text())
    keep = (
        "method",
        "layout",
        "K",
        "queries_per_s",
        "speedup_vs_hf_batched",
        "speedup_vs_reference_loop",
        "peak_mem_bytes",
    )
    return {
        "name": step.name,
        "command": " ".join(["bench/fusion_throughput.py", *cmd[2:-4]]),
        "compute_dtype": result.get("compute_dtype"),
        "wall_s": wall,
        "records": [{k: r.get(k) for k in keep} for r in result["records"]],
        "cross_layout": result.get("cross_layout", []),
    }


def device_info() -> dict:
    """The GPU's name, memory and compute capability, and the software that ran on it."""
    import triton

    props = torch.cuda.get_device_properties(0)
    return {
        "cuda_name": torch.cuda.get_device_name(0),
        "memory_bytes": props.total_memory,
        "capability": f"sm_{props.major}{props.minor}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "cpu_count": os.cpu_count(),
    }
