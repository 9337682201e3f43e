"""bench/gpu_check.py without a GPU: the dry run plans every step (shapes, bytes against the budget,
estimates) and makes no CUDA call; a budget too small fails in one line naming the step; the
device table, the roofline arithmetic and the report writer against figures computed here; and the
correctness step itself, on the CPU at small sizes (both backends), passing correct ops and failing
broken ones. The CUDA timings cannot run here and are not imitated."""

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import _gpu_check_plan as P  # noqa: E402
from bench import gpu_check  # noqa: E402
from bench._gpu_check_correctness import check, compare  # noqa: E402
from bench._gpu_check_report import markdown, predicted, predicted_markdown, write_report  # noqa: E402
from jomed_fast import ops  # noqa: E402

OPS = ("class_log_softmax", "head_class_log_softmax", "retrieval_kl_loss", "fuse_candidates", "topk_similarity")
GB = 10**9
SMALL = P.Shapes(
    H=32, V=300, classes=(3,), K=5, B=2, kl_rows=4, fuse_rows=4, D=16, N=500, Q_check=3, k=5, ref_chunk=128
)


@pytest.fixture
def no_cuda(monkeypatch):
    """Every torch.cuda entry point the check could reach raises: a dry run must call none."""

    def refuse(*a, **k):
        raise AssertionError("a dry run made a CUDA call")

    for name in (
        "is_available",
        "get_device_name",
        "get_device_properties",
        "synchronize",
        "Event",
        "memory_allocated",
    ):
        monkeypatch.setattr(torch.cuda, name, refuse)
    for name in ("max_memory_allocated", "reset_peak_memory_stats", "empty_cache", "device_count"):
        monkeypatch.setattr(torch.cuda, name, refuse)


def _dry_run(tmp_path, *args):
    out = tmp_path / "plan.json"
    rc = gpu_check.main(["--dry-run", "--out", str(out), *args])
    return rc, json.loads(out.read_text())


# ------------------------------------------------------------------------------------------------
# The dry run
# ------------------------------------------------------------------------------------------------
def test_the_dry_run_plans_every_step_and_makes_no_cuda_call(tmp_path, no_cuda, capsys):
    rc, plan = _dry_run(tmp_path)
    assert rc == 0 and plan["problem"] is None
    names = {s["name"] for s in plan["steps"]}
    for dtype in ("float32", "float16", "bfloat16"):
        for op in ("class_log_softmax", "head_class_log_softmax", "fuse_candidates"):
            assert {f"correctness/{op}/{dtype}/C=2", f"correctness/{op}/{dtype}/C=15"} <= names
        assert {f"correctness/retrieval_kl_loss/{dtype}", f"correctness/topk_similarity/{dtype}"} <= names
    assert {f"speed/{op}" for op in OPS} <= names
    assert {"index_search", "fusion_throughput", "memory_planner"} <= names
    budget = 48 * GB - 500 * (1 << 20)
    assert plan["budget_bytes"] == budget
    for s in plan["steps"]:
        assert s["alloc_bytes"] == sum(a["bytes"] for a in s["allocations"]) > 0
        assert s["fits"] == (s["alloc_bytes"] <= budget) and s["estimated_s"] > 0 and s["repeats"] >= 1
    steps = {s["name"]: s for s in plan["steps"]}
    # the paper's head in fp32: weight and its dense gradient, hidden and its gradient, float64 reference rows
    H, V, N = 3584, 152064, 200
    head = steps["correctness/head_class_log_softmax/float32/C=15"]
    assert head["dims"] == {"N": N, "H": H, "V": V, "C": 15}
    assert head["alloc_bytes"] == 2 * V * H * 4 + 2 * N * H * 4 + 2 * (N + 15) * H * 8
    topk = steps["correctness/topk_similarity/float16"]
    assert topk["dims"] == {"Q": 16, "N": 2_108_000, "D": 768, "k": 50}
    # fp16 index, its fp32 draw chunk and normalised copy, a float64 reference chunk, float64 [Q, N] scores twice
    assert topk["alloc_bytes"] == 2_108_000 * 768 * 2 + 2 * 65_536 * 768 * 4 + 65_536 * 768 * 8 + 2 * 16 * 2_108_000 * 8
    assert plan["estimated_total_s"] == pytest.approx(sum(s["estimated_s"] for s in plan["steps"]))
    assert plan["estimated_total_s"] <= P.TIME_LIMIT_S
    printed = capsys.readouterr().out
    assert "correctness/topk_similarity/bfloat16" in printed and "estimated" in printed


def test_a_budget_too_small_fails_in_one_line_naming_the_step(tmp_path, no_cuda, capsys):
    rc, plan = _dry_run(tmp_path, "--memory-gb", "3")
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    # the first step over 3 GB (less the CUDA context) is the fp32 head: weight + dense gradient
    assert err.startswith("gpu_check: step correctness/head_class_log_softmax/float32/C=2: needs 4.38 GB")
    assert "--memory-gb 3 budget" in err
    assert [s["fits"] for s in plan["steps"]].count(False) >= 2 and plan["problem"] in err


def test_the_index_rows_the_error_suggests_fit(tmp_path, no_cuda, capsys):
    rc, _ = _dry_run(tmp_path, "--memory-gb", "6")
    err = capsys.readouterr().err
    assert rc == 2 and "step correctness/topk_similarity/float32" in err
    rows = int(err.split("--index-rows ")[1].split()[0])
    rc, plan = _dry_run(tmp_path, "--memory-gb", "6", "--index-rows", str(rows))
    assert rc == 0, capsys.readouterr().err
    fp32 = next(s for s in plan["steps"] if s["name"] == "correctness/topk_similarity/float32")
    assert fp32["dims"]["N"] == rows and fp32["alloc_bytes"] <= 6 * GB - 500 * (1 << 20)


def test_a_plan_past_the_time_limit_is_refused():
    step = P.Step("slow", "fusion", "x", "float32", {}, [P.Alloc("a", (1,), "uint8")], allowance_s=P.TIME_LIMIT_S + 1)
    assert "more than the 480 s" in P.check_budget([step], 48, P.DEVICES["L40"])
    assert P.check_budget([P.Step("ok", "fusion", "x", "float32", {}, [])], 48, P.DEVICES["L40"]) is None


def test_the_tolerances_are_the_cpu_tests():
    from conftest import TOLERANCES
    from test_topk_similarity import SCORE_ATOL, SCORE_RTOL

    assert P.TOLERANCES == {str(d).removeprefix("torch."): t for d, t in TOLERANCES.items()}
    assert P.TOPK_SCORE_TOLERANCE == (SCORE_ATOL, SCORE_RTOL)


def test_the_small_reader_config_is_the_built_readers():
    """The dry run's config of the small reader describes the same model as the one the builder makes."""
    from jomed_fast.memory import describe
    from jomed_fast.readers.offline_checkpoints import make_config

    assert describe(P.small_reader_config()) == describe(make_config("qwen2_vl", "small"))


# ------------------------------------------------------------------------------------------------
# The device table and the roofline
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cuda_name,entry,slug",
    [
        ("NVIDIA L40", "L40", "l40"),
        ("NVIDIA L40S", "L40S", "l40s"),
        ("NVIDIA H100 80GB HBM3", "H100 SXM", "h100-80gb-hbm3"),
        ("NVIDIA H100 PCIe", "H100 PCIe", "h100-pcie"),
        ("NVIDIA H200", "H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "A100 80GB", "a100-sxm4-80gb"),
        ("NVIDIA GeForce RTX 4090", "RTX 4090", "geforce-rtx-4090"),
        ("NVIDIA H100 NVL", None, "h100-nvl"),
        ("NVIDIA A100-SXM4-40GB", None, "a100-sxm4-40gb"),
        ("Tesla T4", None, "tesla-t4"),
    ],
)
def test_device_table_lookup_and_slug(cuda_name, entry, slug):
    found = P.lookup_device(cuda_name)
    assert (found.name if found else None) == entry
    assert P.device_slug(cuda_name) == slug


def test_the_table_holds_the_stated_bandwidths():
    stated = {
        "L40": 864,
        "L40S": 864,
        "H100 SXM": 3350,
        "H100 PCIe": 2000,
        "H200": 4800,
        "A100 80GB": 2039,
        "RTX 4090": 1008,
    }
    assert {name: d.bandwidth / 1e9 for name, d in P.DEVICES.items()} == stated


def test_roofline_arithmetic():
    h200 = P.DEVICES["H200"]
    # 3.2 GB in 1 ms is 3.2 TB/s: two thirds of the H200's 4.8 TB/s
    assert P.bandwidth_fraction(3.2e9, 1e-3, h200.bandwidth) == pytest.approx(2 / 3)
    # the L40: 864 MB moves in 1 ms; 181 GFLOP take 1 ms; the floor is the larger
    l40 = P.DEVICES["L40"]
    assert P.floor_seconds(864e6, 0, l40) == pytest.approx(1e-3)
    assert P.floor_seconds(864e6, 2 * 181e9, l40) == pytest.approx(2e-3)
    with pytest.raises(ValueError, match="seconds, bandwidth: expected both > 0"):
        P.bandwidth_fraction(1, 0, 1)
    step = P.Step(
        "s",
        "speed",
        "x",
        "bfloat16",
        {},
        [],
        calls=3,
        moved_bytes=864_000_000,
        baseline_moved_bytes=2 * 864_000_000,
        allowance_s=1,
    )
    assert step.estimated_seconds(l40) == pytest.approx(3 * (1e-3 + 2e-3) + 1)


def test_the_predicted_floors_of_the_paper_top_k():
    steps = P.plan_steps(P.Shapes(), faiss_gpu=False, config=P.small_reader_config())
    rows = {r["name"]: r for r in predicted(steps)}
    assert set(rows) == {f"speed/{op}" for op in OPS} | {"index_search"}
    # fp16 index read once, fp32 queries, fp32 scores + int64 ids; 2 Q N D FLOPs; the baseline
    # also writes and reads back the fp16 [Q, N] scores
    Q, N, D, k = 64, 2_108_000, 768, 50
    nbytes, flops = N * D * 2 + Q * D * 4 + Q * k * 12, 2 * Q * N * D
    for name, bw, peak in (("L40", 864e9, 181e12), ("H200", 4800e9, 989e12)):
        p = rows["speed/topk_similarity"][name]
        op, base = max(nbytes / bw, flops / peak), max((nbytes + 4 * Q * N) / bw, flops / peak)
        assert p["op_us"] == pytest.approx(op * 1e6) and p["baseline_us"] == pytest.approx(base * 1e6)
        assert p["speedup"] == pytest.approx(base / op)
        assert rows["index_search"][name]["baseline_us"] is None  # its baseline is the CPU
    table = predicted_markdown(list(rows.values()))
    assert "| speed/topk_similarity | Q=64 N=2108000 D=768 k=50 | 3747.83 | 4372.42 | 1.2 | 674.61 |" in table
    assert "L40 op us (predicted)" in table and "H200 x (predicted)" in table


def test_the_readme_quotes_the_model_s_predictions():
    steps = P.plan_steps(P.Shapes(), faiss_gpu=False, config=P.small_reader_config())
    rows = {r["name"]: r for r in predicted(steps)}
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## GPU\n") :].split("\n## ")[0]
    head, topk, search = rows["speed/head_class_log_softmax"], rows["speed/topk_similarity"], rows["index_search"]
    l40, h200 = head["L40"], head["H200"]
    assert (
        f"| {l40['op_us']:.1f} us / {l40['baseline_us']:.0f} us | {h200['op_us']:.2f} us / {h200['baseline_us']:.0f} us |"
        in section
    )
    l40, h200 = topk["L40"], topk["H200"]
    ms = "{:.2f} ms / {:.2f} ms"
    assert (
        f"| {ms.format(l40['op_us'] / 1e3, l40['baseline_us'] / 1e3)} | {ms.format(h200['op_us'] / 1e3, h200['baseline_us'] / 1e3)} |"
        in section
    )
    assert f"| {search['L40']['op_us']:.0f} us | {search['H200']['op_us']:.0f} us |" in section
    assert section.count("**predicted**") >= 3


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------
def _results():
    return {
        "device": {
            "cuda_name": "NVIDIA H200",
            "memory_bytes": 150_000_000_000,
            "capability": "sm_90",
            "torch": "2.13.0",
            "cuda": "12.6",
            "triton": "3.7.1",
            "cpu_count": 16,
            "table": {"name": "H200", "bandwidth": 4.8e12, "flops": 989e12},
            "copy_bandwidth": 4.0e12,
        },
        "commit": "abc1234",
        "plan": {"steps": []},
        "correctness": [
            {
                "name": "correctness/fuse_candidates/bfloat16/C=15",
                "op": "fuse_candidates",
                "dtype": "bfloat16",
                "dims": {"B": 1024, "K": 50, "C": 15},
                "atol": 1.6e-2,
                "rtol": 1.6e-2,
                "max_abs_error": {"out": 3.1e-3, "d scores": 0.5},
                "within": {"out": True, "d scores": False},
                "passed": False,
            }
        ],
        "speed": [
            {
                "name": "speed/topk_similarity",
                "op": "topk_similarity",
                "dtype": "float16",
                "dims": {"Q": 64, "N": 2108000, "D": 768, "k": 50},
                "baseline": "matmul [Q, N] + torch.topk",
                "fast_ms": 1.25,
                "baseline_ms": 2.5,
                "speedup": 2.0,
                "moved_bytes": 3_000_000_000,
                "baseline_moved_bytes": 3_500_000_000,
                "fraction_of_table_bandwidth": 0.5,
                "baseline_fraction_of_table_bandwidth": 0.2917,
                "fraction_of_measured_copy_bandwidth": 0.6,
                "baseline_fraction_of_measured_copy_bandwidth": 0.35,
            }
        ],
        "index_search": {
            "dims": {"Q": 64, "N": 200000, "D": 768, "k": 50},
            "cpu_threads": 16,
            "cpu_ms": 120.0,
            "gpu_ms": 0.4,
            "ratio_cpu_over_gpu": 300.0,
            "max_abs_score_diff": 2e-7,
        },
        "fusion_throughput": {"command": "bench/fusion_throughput.py --size small", "error": "Traceback\nOSError: x"},
        "memory_planner": {
            "rows": [
                {
                    "step": "stage1",
                    "tokens": 8192,
                    "rows": "activations",
                    "predicted_bytes": 5e8,
                    "measured_bytes": 6e8,
                    "ratio": 5 / 6,
                    "within_cpu_test_bound": True,
                }
            ],
            "bound": [0.65, 1.15],
        },
        "errors": [{"name": "memory_planner", "error": "OutOfMemoryError: CUDA out of memory"}],
        "passed": False,
        "wall_s": 301.0,
        "not_finite": float("nan"),
    }


def test_the_report_is_written_as_json_and_markdown(tmp_path):
    results = _results()
    json_path, md_path = write_report(results, tmp_path / "gpu")
    assert (json_path.name, md_path.name) == ("h200.json", "h200.md")
    assert sorted(p.name for p in (tmp_path / "gpu").iterdir()) == ["h200.json", "h200.md"]  # no temp files left
    back = json.loads(json_path.read_text())
    assert back["not_finite"] is None
    del results["not_finite"], back["not_finite"]
    assert back == results
    md = md_path.read_text()
    assert md == markdown(back)  # rebuilt from its JSON alike
    assert md.startswith("# GPU check: NVIDIA H200\n")
    assert "4800 GB/s (H200); measured device-to-device copy: 4000 GB/s" in md
    assert (
        "| correctness/fuse_candidates/bfloat16/C=15 | out 3.10e-03; d scores 5.00e-01 | 1.6e-02 | 1.6e-02 | **FAIL** |"
        in md
    )
    assert "0 of 1 passed." in md
    assert (
        "| topk_similarity | Q=64 N=2108000 D=768 k=50 | matmul [Q, N] + torch.topk | 1.2500 | 2.5000 | 2.0x | 50% | 60% | 29% | 35% |"
        in md
    )
    assert "| Q=64 N=200000 D=768 k=50 | 120.00 | 0.400 | 300x | 2.0e-07 |" in md
    assert "Did not complete: OSError: x" in md
    assert "| stage1 | 8192 | activations | 500.0 | 600.0 | 0.83 | yes |" in md
    assert md.endswith("## Steps that raised\n\n- `memory_planner`: OutOfMemoryError: CUDA out of memory\n")


def test_a_results_dict_the_writer_cannot_read_leaves_no_file(tmp_path):
    results = _results()
    del results["speed"]
    with pytest.raises(KeyError):
        write_report(results, tmp_path)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# The correctness step, on the CPU at small sizes
# ------------------------------------------------------------------------------------------------
def _small_steps():
    return P.correctness_steps(SMALL)


@pytest.mark.parametrize("step", _small_steps(), ids=lambda s: s.name)
def test_correct_ops_pass(step, backend):
    row = check(step, SMALL, "cpu")
    assert row["passed"], row
    assert set(row["within"]) == set(row["max_abs_error"]) and all(
        math.isfinite(v) for v in row["max_abs_error"].values()
    )


def _broken(monkeypatch, name, wrap):
    real = getattr(ops, name)
    monkeypatch.setattr(ops, name, lambda *a, **k: wrap(real(*a, **k)))


def _step(op, dtype="float32"):
    return next(s for s in _small_steps() if s.op == op and s.dtype == dtype)


def test_a_wrong_output_fails(monkeypatch):
    _broken(monkeypatch, "fuse_candidates", lambda out: out * (1 + 1e-3))
    row = check(_step("fuse_candidates"), SMALL, "cpu")
    assert not row["passed"] and not row["within"]["out"] and row["within"]["d scores"] is not None


def test_a_gradient_off_the_class_rows_fails(monkeypatch):
    # a head whose loss also reaches one weight row outside the classes
    real = ops.head_class_log_softmax

    def leaky(hidden, weight, ids, bias=None):
        other = (ids.max() + 1) % weight.shape[0]
        return real(hidden, weight, ids, bias) + 1e-9 * weight[other].sum()

    monkeypatch.setattr(ops, "head_class_log_softmax", leaky)
    row = check(_step("head_class_log_softmax"), SMALL, "cpu")
    assert not row["passed"] and not row["within"]["d weight (other rows)"]
    assert row["within"]["out"]


def test_wrong_topk_ids_fail(monkeypatch):
    # the second best swapped for the 20th: scores stay sorted, ids and their own scores disagree
    real = ops.topk_similarity

    def swapped(q, x, k):
        scores, ids = real(q, x, k + 20)
        keep = torch.cat([ids[:, :1], ids[:, 20:21], ids[:, 2:k]], dim=1)
        return scores[:, :k], keep

    monkeypatch.setattr(ops, "topk_similarity", swapped)
    row = check(_step("topk_similarity"), SMALL.replace(k=5), "cpu")
    assert not row["passed"] and not row["within"]["scores of the returned ids"]


def test_compare_counts_nan_as_a_failure():
    f64 = dict(dtype=torch.float64)
    assert compare(torch.tensor([1.0, 2.0], **f64), torch.tensor([1.0, 2.0 + 1e-6], **f64), 1e-5, 0) == (
        pytest.approx(1e-6),
        True,
    )
    assert compare(torch.tensor([1.0], **f64), torch.tensor([1.0 + 2e-5], **f64), 1e-5, 0)[1] is False
    assert compare(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0]), 1e-5, 0)[1] is False
    assert compare(torch.tensor([1.1]), torch.tensor([1.0]), 0, 0.2) == (pytest.approx(0.1), True)


def test_the_cli_dry_run_is_automatic_without_cuda(tmp_path):
    """As CI and ``make gpu-check`` run it: a subprocess, no flag, a machine without CUDA."""
    import subprocess

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "plan.json"
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu_check.py"),
            "--out",
            str(out),
            "--report-dir",
            str(tmp_path / "gpu"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )
    assert res.returncode == 0, res.stderr
    assert "a dry run" in res.stderr and json.loads(out.read_text())["problem"] is None
    assert not (tmp_path / "gpu").exists()
