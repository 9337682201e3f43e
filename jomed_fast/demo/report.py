"""The demo's report: the paper's tables on the synthetic test split, and the qualitative checks.

Tables (each as JSON + markdown + PNG through ``analysis.write_analysis``):

* main (Tables 2-4): accuracy and macro-F1 of reader-only, fine-tuned RAG and JOMED;
* consistency (Tables 5-6): the same per split, the split fixed by fine-tuned RAG's candidates
  (after stage 1), with the share of inconsistent queries;
* oracle (Table 1): any candidate right, for fine-tuned RAG's and JOMED's candidates;
* robustness (Table 7): JOMED with no retrieval, random retrieval, no query image, and a
  uniform-random classifier;
* reranking (Table 8): JOMED's top-1 candidate of each head by retrieval score, by reader confidence, fusion;
* per-class F1 of the three systems, each system's share of inconsistent queries, and the
  reliability diagram of their fused probabilities (``calibration``).

Every chart shows the numbers of its table (percent, one decimal), with the queries behind them.

Checks (the paper's qualitative findings): reader-only < fine-tuned RAG < JOMED on accuracy and
macro-F1, JOMED at least 2 points over fine-tuned RAG on both, JOMED's gain over fine-tuned RAG
largest on the inconsistent split, and the oracle above JOMED.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..analysis import (
    PAPER_RERANKERS,
    metrics_table,
    oracle_accuracy,
    rerank_accuracy,
    split_consistency,
    uniform_random_records,
    write_analysis,
    write_calibration,
    write_consistency_tables,
    write_per_class_f1,
)
from ..analysis.figures import columns_label
from ..data.io import atomic_write_text

__all__ = ["check_findings", "write_report"]

MIN_GAIN = 0.02


def check_findings(main: dict, consistency: dict, oracle: dict) -> dict:
    """The paper's qualitative findings as named booleans (with the numbers they compare)."""
    ro, rag, jomed = main["reader_only"], main["ft_rag"], main["jomed"]
    acc = consistency["accuracy"]["systems"]
    gain = {
        s: acc["jomed"][s] - acc["ft_rag"][s]
        for s in ("inconsistent", "consistent")
        if acc["jomed"][s] is not None and acc["ft_rag"][s] is not None
    }
    return {
        "reader_only<ft_rag<jomed (accuracy)": ro["accuracy"] < rag["accuracy"] < jomed["accuracy"],
        "reader_only<ft_rag<jomed (macro_f1)": ro["macro_f1"] < rag["macro_f1"] < jomed["macro_f1"],
        f"jomed-ft_rag>={MIN_GAIN:g} (accuracy)": jomed["accuracy"] - rag["accuracy"] >= MIN_GAIN,
        f"jomed-ft_rag>={MIN_GAIN:g} (macro_f1)": jomed["macro_f1"] - rag["macro_f1"] >= MIN_GAIN,
        "largest gain on the inconsistent split": len(gain) == 2 and gain["inconsistent"] > gain["consistent"],
        "oracle>jomed": oracle["jomed"] > jomed["accuracy"],
    }


def _md_table(title: str, table: dict) -> str:
    cols = list(next(iter(table.values())).keys())
    lines = [f"### {title}", "", "| system | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for row, vals in table.items():
        lines.append(
            f"| {row} | " + " | ".join("-" if vals[c] is None else f"{100 * vals[c]:.1f}" for c in cols) + " |"
        )
    return "\n".join(lines) + "\n"


def write_report(
    out_dir,
    records: dict,
    num_classes: int,
    seed: int = 0,
    *,
    findings_asserted: bool = True,
    class_names: Sequence[str] | None = None,
) -> dict:
    """Write every table and ``report.md`` to ``out_dir``; return the summary (tables + checks).

    ``findings_asserted`` False (a preset too small for the findings) marks the checks as
    informational in ``report.md``; ``class_names`` name the classes of the per-class chart.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    systems = {k: records[k] for k in ("reader_only", "ft_rag", "jomed")}
    queries = {k: len(v) for k, v in records.items()}
    main = metrics_table(systems, num_classes)
    write_analysis(
        str(out),
        "main",
        main,
        title="Reader only, fine-tuned RAG and JOMED (Tables 2-4)",
        ylabel=columns_label(list(next(iter(main.values())))),
        row_n=queries,
    )
    split = split_consistency(records["ft_rag"])
    consistency = write_consistency_tables(str(out), systems, split, num_classes, extra={"split_from": "ft_rag"})
    oracle = {k: oracle_accuracy(records[k]) for k in ("ft_rag", "jomed")}
    oracle_table = {k: {"fused": main[k]["accuracy"], "oracle": v} for k, v in oracle.items()}
    write_analysis(
        str(out),
        "oracle",
        oracle_table,
        title="Fused answer vs some candidate right (oracle, Table 1)",
        row_n=queries,
    )
    robustness = metrics_table(
        {
            "jomed": records["jomed"],
            "no retrieval": records["jomed_no_retrieval"],
            "random retrieval": records["jomed_random_retrieval"],
            "no query image": records["jomed_no_query_image"],
            "uniform random": uniform_random_records(records["jomed"], num_classes, seed),
        },
        num_classes,
    )
    write_analysis(
        str(out),
        "robustness",
        robustness,
        title="JOMED without retrieval, with random retrieval, without the query image (Table 7)",
        ylabel=columns_label(list(next(iter(robustness.values())))),
        row_n={k: len(records["jomed"]) for k in robustness},
    )
    rerank = {"jomed": rerank_accuracy(records["jomed"], PAPER_RERANKERS)}
    write_analysis(
        str(out), "rerank", rerank, title="Picking one of JOMED's candidates vs fusion (Table 8)", row_n=queries
    )
    write_per_class_f1(str(out), systems, num_classes, class_names)
    write_calibration(str(out), systems)
    checks = check_findings(main, consistency, oracle)
    share = consistency["accuracy"]["share_inconsistent"]
    md = [
        "# JOMED on the synthetic task: report",
        "",
        (
            f"Test queries: {len(records['jomed'])}; inconsistent share (fine-tuned RAG's candidates): "
            f"{100 * share:.1f}%. All figures in percent."
        ),
        "",
        _md_table("Main (accuracy, macro-F1)", main),
        _md_table("Accuracy by split (Tables 5-6)", consistency["accuracy"]["systems"]),
        _md_table("Macro-F1 by split (Tables 5-6)", consistency["macro_f1"]["systems"]),
        _md_table("Oracle (Table 1)", oracle_table),
        _md_table("Robustness (Table 7)", robustness),
        _md_table("Reranking (Table 8)", rerank),
        "### Checks" if findings_asserted else "### Checks (informational: this preset is too small for them)",
        "",
    ]
    md += [f"- [{'x' if ok else ' '}] {name}" for name, ok in checks.items()]
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    return {
        "main": main,
        "consistency": {m: r["systems"] for m, r in consistency.items()},
        "share_inconsistent": share,
        "oracle": oracle,
        "robustness": robustness,
        "rerank": rerank,
        "checks": checks,
    }
