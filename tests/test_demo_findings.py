"""The paper's qualitative findings, reproduced by the demo's ``ci`` preset on its held-out split
(the whole pipeline on 240 training queries, an 800-record index and 160 test queries; about
2.5 minutes on 2 CPU cores): reader-only < fine-tuned RAG < JOMED on accuracy and macro-F1, JOMED
at least 2 points above fine-tuned RAG, its largest gain on the inconsistent split, and the oracle
above it."""

import pytest

from jomed_fast.demo import PRESETS, run_demo

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def test_ci_demo_reproduces_the_papers_findings(tmp_path):
    summary = run_demo(tmp_path, PRESETS["ci"], progress=False)
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
