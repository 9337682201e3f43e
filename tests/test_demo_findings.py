"""The paper's qualitative findings, reproduced by the demo's documented ``full`` run on its
held-out split (400 training queries, 200 validation, a 1,500-record index and 250 test queries;
about 5 minutes on 2 CPU cores, so CI runs the documented configuration itself rather than a
smaller one: on the ``ci`` preset's 800-record index the measured gain was −1.2 to +5.0 points
across settings and seeds, too close to noise to assert): reader-only < fine-tuned RAG < JOMED
on accuracy and macro-F1, JOMED at least 2 points above fine-tuned RAG, its largest gain on the
inconsistent split, and the oracle above it."""

from jomed_fast.demo import PRESETS, run_demo


def test_full_demo_reproduces_the_papers_findings(tmp_path):
    summary = run_demo(tmp_path, PRESETS["full"], progress=False)
    main, acc = summary["main"], summary["consistency"]["accuracy"]
    detail = {"main": main, "consistency": acc, "oracle": summary["oracle"]}
    for metric in ("accuracy", "macro_f1"):
        ro, rag, jomed = (main[s][metric] for s in ("reader_only", "ft_rag", "jomed"))
        assert ro < rag < jomed, (metric, detail)
        assert jomed - rag >= 0.02, (metric, detail)
    gain = {split: acc["jomed"][split] - acc["ft_rag"][split] for split in ("inconsistent", "consistent")}
    assert gain["inconsistent"] > max(gain["consistent"], 0.0), (gain, detail)
    assert summary["oracle"]["jomed"] > main["jomed"]["accuracy"], detail
    assert all(summary["checks"].values()), summary["checks"]
