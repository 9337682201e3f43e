"""The end-to-end demo on the ``smoke`` preset: every step runs, the report has every table, a
rerun resumes without redoing work, and other settings in the same directory are refused."""

import json

import pytest

from jomed_fast.demo import PRESETS, check_findings, run_demo
from jomed_fast.infer import read_predictions

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def test_smoke_demo_runs_every_step_and_resumes(tmp_path):
    config = PRESETS["smoke"]
    summary = run_demo(tmp_path, config, progress=False)
    report = tmp_path / "report"
    for name in ("report.md", "main.json", "main.png", "consistency_accuracy.md", "oracle.json", "robustness.md",
                 "rerank.json", "summary.json"):
        assert (report / name).is_file(), name
    for system in ("reader_only", "ft_rag", "jomed", "jomed_no_retrieval", "jomed_random_retrieval",
                   "jomed_no_query_image"):
        recs = read_predictions(tmp_path / "predictions" / f"{system}.jsonl")
        assert len(recs) == config.n_test
        assert len(recs[0].candidates) == (1 if system in ("reader_only", "jomed_no_retrieval")
                                           else config.k_text + config.k_image)
    assert set(summary["main"]) == {"reader_only", "ft_rag", "jomed"}
    assert set(summary["robustness"]) == {"jomed", "no retrieval", "random retrieval", "no query image",
                                          "uniform random"}
    assert summary["checks"] == check_findings(summary["main"], {m: {"systems": v} for m, v in
                                               summary["consistency"].items()}, summary["oracle"])
    # oracle: some candidate right is at least as often right as any single candidate's own prediction
    ft = read_predictions(tmp_path / "predictions" / "ft_rag.jsonl")
    first = sum(r.candidates[0].prediction == r.gold for r in ft) / len(ft)
    assert summary["oracle"]["ft_rag"] >= first
    # a rerun resumes: nothing is retrained (same adapter and encoder files), same summary
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.safetensors")}
    again = run_demo(tmp_path, config, progress=False)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.safetensors")} == stamps
    assert {k: again[k] for k in ("main", "oracle", "checks")} == {k: summary[k] for k in ("main", "oracle", "checks")}
    assert json.loads((report / "summary.json").read_text())["main"] == summary["main"]
    with pytest.raises(ValueError, match=r"out_dir: .*other settings \(\['n_test'\]\)"):
        run_demo(tmp_path, PRESETS["smoke"].__class__(**{**config.to_dict(), "n_test": 13}), progress=False)
