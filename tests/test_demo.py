"""The end-to-end demo on the ``smoke`` preset: every step runs, the report has every table, a
rerun resumes without redoing work, and other settings in the same directory are refused; the
paper's findings decide the exit code only on a preset that asserts them."""

import json

import pytest

from jomed_fast.cli import main
from jomed_fast.cli.demo import exit_code
from jomed_fast.demo import PRESETS, check_findings, run_demo
from jomed_fast.infer import read_predictions
from jomed_fast.tasks import get_task


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke-preset run shared by the tests below (each rerun resumes it)."""
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, PRESETS["smoke"], progress=False)


def test_smoke_demo_runs_every_step_and_resumes(smoke):
    tmp_path, summary = smoke
    config = PRESETS["smoke"]
    report = tmp_path / "report"
    for name in (
        "report.md",
        "main.json",
        "main.png",
        "consistency_accuracy.md",
        "oracle.json",
        "robustness.md",
        "rerank.json",
        "summary.json",
    ):
        assert (report / name).is_file(), name
    for system in (
        "reader_only",
        "ft_rag",
        "jomed",
        "jomed_no_retrieval",
        "jomed_random_retrieval",
        "jomed_no_query_image",
    ):
        recs = read_predictions(tmp_path / "predictions" / f"{system}.jsonl")
        assert len(recs) == config.data.n_test
        assert len(recs[0].candidates) == (
            1 if system in ("reader_only", "jomed_no_retrieval") else config.inference.k_text + config.inference.k_image
        )
    assert set(summary["main"]) == {"reader_only", "ft_rag", "jomed"}
    # the retrieval-only baselines (the index records' labels) beside the systems, and the
    # significance of every difference the report states
    k = min(4, config.inference.k_text + config.inference.k_image)
    baselines = {f"knn{k}_vote", "ft_rag_candidate_vote", "jomed_candidate_vote"}
    assert set(summary["consistency"]["accuracy"]) == {"reader_only", "ft_rag", "jomed"} | baselines
    assert {"jomed vs ft_rag", "ft_rag vs reader_only", f"jomed vs knn{k}_vote"} <= set(summary["significance"])
    assert 0 <= summary["significance"]["jomed vs ft_rag"]["p_mcnemar"] <= 1
    assert "| JOMED vs fine-tuned RAG | all |" in (report / "report.md").read_text()
    assert (report / "significance.md").is_file()
    assert set(summary["robustness"]) == {
        "jomed",
        "no retrieval",
        "random retrieval",
        "no query image",
        "uniform random",
    }
    split = {m: {"systems": v} for m, v in summary["consistency"].items()}
    classes = len(get_task("synthetic").labels)
    assert summary["checks"] == check_findings(summary["main"], split, summary["robustness"], classes)
    assert set(summary["context"]) == {"reader_only<ft_rag (accuracy)", "oracle>=jomed (accuracy)"}
    assert summary["context"]["oracle>=jomed (accuracy)"]["held"] == (
        summary["oracle"]["jomed"] >= summary["main"]["jomed"]["accuracy"]
    )
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
        run_demo(tmp_path, config.replace(n_test=13), progress=False)


def test_smoke_demo_reports_the_findings_as_informational_and_exits_0(smoke, capsys):
    out, summary = smoke
    code = main(["demo", "--preset", "smoke", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    held, n = sum(summary["checks"].values()), len(summary["checks"])
    assert f"measured checks (informational: the smoke preset is too small for them): {held} of {n} hold\n" in printed
    assert json.loads(printed[: printed.index("\n}\n") + 2])["findings"] == "informational"
    assert "### Checks (informational: this preset is too small for them)" in (out / "report" / "report.md").read_text()


def _fake_run_demo(checks: dict, seen: list):
    def run(out_dir, config, *, progress=True):
        seen.append(config)
        return {"main": {}, "checks": checks, "seconds": 0.0}

    return run


def test_a_preset_that_asserts_the_findings_exits_1_when_one_fails(tmp_path, capsys, monkeypatch):
    import jomed_fast.demo

    checks = {"oracle>jomed": True, "largest gain on the inconsistent split": False}
    seen = []
    monkeypatch.setattr(jomed_fast.demo, "run_demo", _fake_run_demo(checks, seen))
    assert main(["demo", "--preset", "full", "--out", str(tmp_path), "--no-progress"]) == 1
    printed = capsys.readouterr().out
    assert (
        "measured checks (asserted by the full preset; an existence proof): 1 of 2 hold; failed: largest gain on the inconsistent split"
        in printed
        and seen[-1] == PRESETS["full"]
        and seen[-1].asserts_findings
    )
    # the same summary on a preset too small for the findings: informational, exit 0
    assert main(["demo", "--preset", "ci", "--out", str(tmp_path), "--no-progress", "--n-test", "7"]) == 0
    assert (
        "measured checks (informational: the ci preset is too small for them): 1 of 2 hold" in capsys.readouterr().out
    )
    assert seen[-1].data.n_test == 7 and not seen[-1].asserts_findings  # flags keep the preset's property
    # every finding held: exit 0 on a preset that asserts them
    monkeypatch.setattr(jomed_fast.demo, "run_demo", _fake_run_demo(dict.fromkeys(checks, True), seen))
    assert main(["demo", "--preset", "full", "--out", str(tmp_path), "--no-progress"]) == 0
    assert "measured checks (asserted by the full preset; an existence proof): 2 of 2 hold\n" in capsys.readouterr().out


def test_exit_code_follows_the_findings_only_where_the_preset_asserts_them():
    assert [exit_code({"a": True, "b": False}, asserted) for asserted in (True, False)] == [1, 0]
    assert [exit_code({"a": True, "b": True}, asserted) for asserted in (True, False)] == [0, 0]


def test_which_presets_assert_the_findings_is_theirs_and_said_in_help(capsys):
    from jomed_fast.cli import commands

    assert {name: p.asserts_findings for name, p in PRESETS.items()} == {"full": True, "ci": False, "smoke": False}
    # not a setting of the run: not saved with it (a rerun resumes), not an option
    assert "asserts_findings" not in PRESETS["full"].to_dict()
    assert "asserts_findings" not in {o.name for o in commands()["demo"].options}
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "full asserts them (exit code 1 when one fails); smoke and ci are too small for them and report them "
        "as informational" in text
    )
