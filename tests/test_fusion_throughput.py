"""bench/fusion_throughput.py on the tiny reader with tiny settings: every record has every field,
the methods agree, and the counted LLM tokens and vision images equal counts predicted here
independently (each prompt encoded alone by the processor). Timings are never asserted. And the
shared bench/_harness.py: round-robin order, the CPU clock, the peak-memory probe, tables, JSON."""

import importlib
import importlib.util
import json
import os
import sys
import time
import warnings

import numpy as np
import pytest
import torch

from jomed_fast import prompts
from jomed_fast.tasks import get_task

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "fusion_throughput.py")
B, KS = 2, (1, 4)


def _bench():
    spec = importlib.util.spec_from_file_location("fusion_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    bench = _bench()
    out = tmp_path_factory.mktemp("fusion")
    threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = bench.main(
                [
                    "--k",
                    ",".join(map(str, KS)),
                    "--queries",
                    str(B),
                    "--reference-queries",
                    "1",
                    "--repeats",
                    "1",
                    "--reference-repeats",
                    "1",
                    "--json",
                    str(out / "r.json"),
                ]
            )
    finally:
        torch.set_num_threads(threads)
    return bench, res, out


def test_json_has_every_field_and_the_plot(result):
    bench, _, out = result
    on_disk = json.loads((out / "r.json").read_text())
    assert (out / "r.png").stat().st_size > 0
    records = on_disk["records"]
    # reference_loop, hf_batched x 2 layouts, jomed_paper, jomed_shared_query at each K
    assert len(records) == 5 * len(KS)
    for r in records:
        assert tuple(r) == bench.RECORD_FIELDS
        assert r["queries_per_s"] > 0 and r["candidates_per_s"] == pytest.approx(r["queries_per_s"] * r["K"])
        assert r["max_abs_logprob_diff"] < 1e-3
        assert r["flop_model_speedup"] > 0 and r["peak_mem_bytes"] > 0
    keys = {(r["method"], r["layout"], r["K"]) for r in records}
    for K in KS:
        assert {
            ("hf_batched", "paper", K),
            ("hf_batched", "shared_query", K),
            ("reference_loop", "paper", K),
            ("jomed_paper", "paper", K),
            ("jomed_shared_query", "shared_query", K),
        } <= keys
    assert set(on_disk["growth"]) and on_disk["cross_layout"]


def _encoded_lengths(reader, layout, qimgs, cands):
    """Each prompt alone through the processor: ``[B][K]`` token counts (images expanded)."""
    task = get_task("synthetic")
    out = []
    for q, row in zip(qimgs, cands):
        lengths = []
        for c in row:
            messages, images = prompts.build_messages(layout, task, q, None, c)
            lengths.append(int(reader.processor.encode(images, messages)["input_ids"].shape[1]))
        out.append(lengths)
    return out


def test_counts_equal_independent_predictions(result):
    bench, res, _ = result
    args = bench.parse_args(["--k", "4", "--queries", str(B)])
    reader, _ = bench.load(args)
    task = get_task("synthetic")
    qimgs, cands = bench.make_workload(B, max(KS), args.image_size, args.seed)
    steps = res["generate_steps"]
    for K in KS:
        rows = [row[:K] for row in cands]
        rec = {(r["method"], r["layout"]): r for r in res["records"] if r["K"] == K}
        distinct_candidates = len({id(c.image) for row in rows for c in row})
        for layout in prompts.LAYOUTS:
            lengths = _encoded_lengths(reader, layout, qimgs, rows)
            # hf_batched: every prompt whole, two images per prompt
            hf = rec["hf_batched", layout]
            assert hf["llm_tokens"] == sum(map(sum, lengths))
            assert hf["vision_images"] == B * K * 2
            # the toolkit: the query image once, each distinct candidate image once
            ours = rec[f"jomed_{layout}", layout]
            assert ours["vision_images"] == B + distinct_candidates
            shapes = bench.prompt_shapes(reader, task, layout, qimgs, rows)
            assert [[p.tokens for p in row] for row in shapes] == lengths  # prefix + suffix = the prompt
            prefixes = {p.prefix for row in shapes for p in row}
            assert ours["llm_tokens"] == sum(P for _, P in prefixes) + sum(p.suffix for row in shapes for p in row)
            if layout == "paper":
                assert len(prefixes) == 1  # the system part, shared by every query
            else:
                assert len(prefixes) == B  # system + query image + question, once per query
                assert K == 1 or ours["llm_tokens"] < hf["llm_tokens"]
        # reference_loop: one query, each prompt once per generated step (growing), images at step 0
        ref = rec["reference_loop", "paper"]
        n_steps = steps[f"reference_loop/paper@{K}"]
        lengths = _encoded_lengths(reader, "paper", qimgs[:1], rows[:1])[0]
        assert len(n_steps) == K and all(1 <= s <= bench.MAX_NEW_TOKENS for s in n_steps)
        assert ref["llm_tokens"] == sum(L + j for L, s in zip(lengths, n_steps) for j in range(s))
        assert ref["vision_images"] == K * 2


def test_flop_model_figures_are_consistent(result):
    _, res, _ = result
    for r in res["records"]:
        if r["method"] == "hf_batched":
            assert r["flop_model_speedup"] == pytest.approx(1.0) and r["speedup_vs_hf_batched"] == pytest.approx(1.0)
        assert r["fraction_of_flop_bound"] == pytest.approx(r["speedup_vs_hf_batched"] / r["flop_model_speedup"])
    big = {r["method"]: r for r in res["records"] if r["K"] == max(KS)}
    assert big["jomed_shared_query"]["flop_model_speedup"] > big["jomed_paper"]["flop_model_speedup"] > 1
    assert big["reference_loop"]["flop_model_speedup"] < 1


def test_arguments_are_checked():
    bench = _bench()
    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "hf_batched,magic"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--k", "0"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--clock", "cpu", "--threads", "2"])


def test_a_method_run_alone_reports_no_agreement_and_no_ratio(tmp_path, capsys):
    """With no other method of its layout beside it, nothing was compared: null, not 0."""
    bench = _bench()
    threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bench.main(
                [
                    "--methods",
                    "jomed_paper",
                    "--k",
                    "1",
                    "--queries",
                    "1",
                    "--repeats",
                    "1",
                    "--json",
                    str(tmp_path / "alone.json"),
                ]
            )
    finally:
        torch.set_num_threads(threads)
    (record,) = json.loads((tmp_path / "alone.json").read_text())["records"]
    assert record["max_abs_logprob_diff"] is None and record["speedup_vs_hf_batched"] is None
    assert record["queries_per_s"] > 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "jomed_paper" in line).split()
    assert row[:3] == ["1", "jomed_paper", "paper"] and row[-1] == "nan"
    assert int(row[-2]) == record["vision_images"] and int(row[-3]) == record["llm_tokens"]


# ------------------------------------------------------------------------------------------------
# bench/_harness.py: the timer, the memory probe and the writers every bench uses
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def harness():
    root = os.path.dirname(os.path.dirname(BENCH))
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module("bench._harness")


def test_round_robin_warms_up_then_interleaves(harness):
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    timings = harness.round_robin(
        fns, {"a": 2, "b": 1, "c": 0}, warmup=1, on_round=lambda r, n: calls.append(f"round {r + 1}/{n}")
    )
    assert calls == ["a", "b", "c", "a", "b", "round 1/2", "a", "round 2/2"]
    assert [len(timings[n]) for n in "abc"] == [2, 1, 0]
    assert all(t.seconds >= 0 and t.peak_bytes is None for t in timings["a"])


def test_the_cpu_clock_leaves_out_waiting(harness):
    _, wall = harness.time_call(lambda: time.sleep(0.2))
    _, cpu = harness.time_call(lambda: time.sleep(0.2), clock="cpu")
    assert wall.seconds >= 0.2 and cpu.seconds < 0.1


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's resettable VmHWM")
def test_peak_memory_sees_a_call_s_allocation_and_resets(harness):
    memory, size = harness.PeakMemory("cpu"), 96 * 2**20
    memory.reset()
    before = memory.peak()
    _, t = harness.time_call(lambda: np.ones(size // 8).sum(), memory=memory)  # written, then freed
    assert t.peak_bytes - before >= 0.9 * size
    memory.reset()
    assert memory.peak() < t.peak_bytes - 0.5 * size


def test_tables_and_json(harness, tmp_path):
    cols = [
        harness.Column("name", 6, "name", align="<"),
        harness.Column("x", 7, "x", ".2f", suffix="x"),
        harness.Column("n", 4, lambda r: r["n"] * 2, "d"),
    ]
    rows = [{"name": "ab", "x": 1.5, "n": 3}, {"name": "cdefgh", "x": float("nan"), "n": 10}]
    assert harness.text_table(cols, rows) == (
        "name         x    n\n-------------------\nab       1.50x    6\ncdefgh    nanx   20"
    )
    assert harness.markdown_table(["a", "b"], "lr", [["1", "2"]]) == "| a | b |\n|---|---:|\n| 1 | 2 |"
    harness.write_json(tmp_path / "out" / "r.json", {"ratio": float("inf"), "pair": (1, float("nan")), 2: "k"})
    text = (tmp_path / "out" / "r.json").read_text()
    assert text.endswith("\n") and json.loads(text) == {"ratio": None, "pair": [1, None], "2": "k"}
