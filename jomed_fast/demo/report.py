"""The demo's report: the paper's tables on the synthetic test split, and the qualitative checks.

Tables (each as JSON + markdown + PNG through ``analysis.write_analysis``):

* main (Table 1): accuracy and macro-F1 of reader-only, fine-tuned RAG and JOMED;
* consistency (Tables 5-6): the same per split, the split fixed by fine-tuned RAG's candidates
  (after stage 1), with the share of inconsistent queries;
* oracle (Table 1): any candidate right, for fine-tuned RAG's and JOMED's candidates;
* robustness (Table 7): JOMED with no retrieval, random retrieval, no query image, and a
  uniform-random classifier;
* reranking (Table 8): one of the candidates picked (top-1 by retrieval, per head and across heads
  by each head's own retrieval softmax; top-1 by reader confidence) vs fusion and the oracle, for
  fine-tuned RAG's and JOMED's candidates, on each system's inconsistent queries (the paper's
  part) with the consistent and all queries beside, every cell with its n and 95% Wilson interval
  (``analysis.write_rerank_tables``);
* baselines: with the index records' labels, the retrieval-only votes (``analysis.baselines``: the
  kNN vote over fine-tuned RAG's candidates, the base retriever's, and each system's candidate
  vote) as rows of the consistency tables;
* significance: every difference between the three systems, and between each and each baseline,
  with the exact McNemar p and paired bootstrap intervals (``analysis.significance``, seeded by
  the demo's seed);
* per-class F1 of the three systems, each system's share of inconsistent queries, and the
  reliability diagram of their fused probabilities (``calibration``).

Every chart shows the numbers of its table (percent, one decimal), with the queries behind them.

What the run shows is split by what could have come out otherwise. The task is built to contain
a cue stage 2 can learn (``data.synthetic``: ``atypical_cue``), so a held check is an existence
proof (the pipeline can realise the paper's orderings), not evidence about medical data.

* checks (measurements: each could fail, and fails on some seeds): fine-tuned RAG < JOMED on
  accuracy and macro-F1, by at least 2 points on both; JOMED's gain over fine-tuned RAG larger on
  the inconsistent split than on the consistent one; and Table 7's orderings, random retrieval at
  or above reader-only and JOMED without the query image at least 10 points above chance (1 / C);
* context (not findings: they hold by construction, or trivially while the reader-only model is at
  chance): reader-only < fine-tuned RAG, and the oracle at or above JOMED's fused accuracy (any
  candidate right is almost always at least the fused answer right).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..analysis import (
    metrics_table,
    oracle_accuracy,
    rerank_table,
    retrieval_baselines,
    significance_table,
    split_consistency,
    uniform_random_records,
    write_analysis,
    write_calibration,
    write_consistency_tables,
    write_per_class_f1,
    write_rerank_tables,
    write_significance,
)
from ..analysis.baselines import DEFAULT_K
from ..analysis.figures import columns_label
from ..analysis.rerank_tables import rerank_markdown
from ..analysis.rerankers import accuracies
from ..analysis.significance import DEFAULT_BOOTSTRAP, significance_markdown
from ..data.io import atomic_write_text

__all__ = ["check_findings", "write_report"]

MIN_GAIN = 0.02
# Table 7: "without the query image well above chance"; chance is 1 / C on the balanced test split
ABOVE_CHANCE = 0.10
# reader-only within this of chance: "reader-only < fine-tuned RAG" says nothing about the reader
AT_CHANCE = 0.05


def check_findings(main: dict, consistency: dict, robustness: dict, num_classes: int) -> dict:
    """The measured findings as named booleans: each could come out either way on this task."""
    ro, rag, jomed = main["reader_only"], main["ft_rag"], main["jomed"]
    acc = consistency["accuracy"]["systems"]
    gain = {
        s: acc["jomed"][s] - acc["ft_rag"][s]
        for s in ("inconsistent", "consistent")
        if acc["jomed"][s] is not None and acc["ft_rag"][s] is not None
    }
    chance = 1.0 / num_classes
    return {
        "ft_rag<jomed (accuracy)": rag["accuracy"] < jomed["accuracy"],
        "ft_rag<jomed (macro_f1)": rag["macro_f1"] < jomed["macro_f1"],
        f"jomed-ft_rag>={MIN_GAIN:g} (accuracy)": jomed["accuracy"] - rag["accuracy"] >= MIN_GAIN,
        f"jomed-ft_rag>={MIN_GAIN:g} (macro_f1)": jomed["macro_f1"] - rag["macro_f1"] >= MIN_GAIN,
        "largest gain on the inconsistent split": len(gain) == 2 and gain["inconsistent"] > gain["consistent"],
        "random retrieval>=reader_only (accuracy, Table 7)": (
            robustness["random retrieval"]["accuracy"] >= ro["accuracy"]
        ),
        f"no query image>=chance+{ABOVE_CHANCE:g} (accuracy, Table 7)": (
            robustness["no query image"]["accuracy"] >= chance + ABOVE_CHANCE
        ),
    }


def context_findings(main: dict, oracle: dict, num_classes: int) -> dict:
    """What holds by construction or trivially here, each ``{"held": bool, "why": str}``: reported
    beside the checks, never counted as findings."""
    ro, rag, jomed = main["reader_only"], main["ft_rag"], main["jomed"]
    at_chance = abs(ro["accuracy"] - 1.0 / num_classes) <= AT_CHANCE
    return {
        "reader_only<ft_rag (accuracy)": {
            "held": ro["accuracy"] < rag["accuracy"],
            "why": (
                f"reader-only is within {100 * AT_CHANCE:g} points of chance: any reader that uses its context beats it"
                if at_chance
                else "reader-only is above chance here: a measurement on this run"
            ),
        },
        "oracle>=jomed (accuracy)": {
            "held": oracle["jomed"] >= jomed["accuracy"],
            "why": "by construction, up to fusion picking a class no candidate predicts",
        },
    }


def _reading_of(checks: dict, synthetic: bool) -> list[str]:
    """Markdown lines: what the checks show and what they do not."""
    held = sum(checks.values())
    if not synthetic:
        return [f"{held} of {len(checks)} measured checks hold on this run (one seed of one task).", ""]
    return [
        (
            f"{held} of {len(checks)} measured checks hold. The synthetic task is built to contain a cue "
            "stage 2 can learn (`atypical_cue`): a held check shows the pipeline can realise the paper's "
            "ordering on such a task (an existence proof), not that it does on medical data, nor on every seed."
        ),
        "",
    ]


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
    index_labels: Mapping[str, Any] | None = None,
    task_name: str | None = None,
) -> dict:
    """Write every table and ``report.md`` to ``out_dir``; return the summary (tables + checks).

    ``findings_asserted`` False (a preset too small for the findings) marks the checks as
    informational in ``report.md``; ``class_names`` name the classes of the per-class chart;
    ``index_labels`` (``analysis.index_labels`` of the index records) adds the baselines;
    ``task_name`` names a real task the run was on (``None``: the synthetic task, whose checks
    are read as existence proofs).
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
        title="Reader only, fine-tuned RAG and JOMED (Table 1)",
        ylabel=columns_label(list(next(iter(main.values())))),
        row_n=queries,
    )
    split = split_consistency(records["ft_rag"])
    baselines = {}
    if index_labels:  # the paper's 4 neighbours, or all of them when a preset retrieves fewer
        k = min(DEFAULT_K, *(len(r.candidates) for r in records["ft_rag"]))
        baselines = retrieval_baselines(systems, index_labels, "ft_rag", k)
    consistency = write_consistency_tables(
        str(out), systems, split, num_classes, extra={"split_from": "ft_rag"}, baselines=baselines
    )
    significance = significance_table(systems, split, num_classes, baselines, n_boot=DEFAULT_BOOTSTRAP, seed=seed)
    write_significance(str(out), significance, DEFAULT_BOOTSTRAP, seed)
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
    rerank = {k: rerank_table(records[k]) for k in ("ft_rag", "jomed")}
    write_rerank_tables(str(out), rerank)
    write_per_class_f1(str(out), systems, num_classes, class_names)
    write_calibration(str(out), systems)
    checks = check_findings(main, consistency, robustness, num_classes)
    context = context_findings(main, oracle, num_classes)
    share = consistency["accuracy"]["share_inconsistent"]
    md = [
        f"# JOMED on {task_name or 'the synthetic task'}: report",
        "",
        (
            f"Test queries: {len(records['jomed'])}; inconsistent share (fine-tuned RAG's candidates): "
            f"{100 * share:.1f}%. All figures in percent."
        ),
        "",
        _md_table("Main (Table 1: accuracy, macro-F1)", main),
        _md_table("Accuracy by split (Tables 5-6)", consistency["accuracy"]["systems"]),
        _md_table("Macro-F1 by split (Tables 5-6)", consistency["macro_f1"]["systems"]),
        _md_table("Oracle (Table 1)", oracle_table),
        "### Paired significance (differences in points; the first system minus the second)",
        "",
        significance_markdown(significance, DEFAULT_BOOTSTRAP, seed),
        _md_table("Robustness (Table 7)", robustness),
        "### Reranking (Table 8)",
        "",
        rerank_markdown(rerank),
        "### Checks: measurements"
        if findings_asserted
        else "### Checks (informational: this preset is too small for them)",
        "",
        *_reading_of(checks, synthetic=task_name is None),
    ]
    md += [f"- [{'x' if ok else ' '}] {name}" for name, ok in checks.items()]
    md += ["", "### Context: not findings (by construction, or trivial here)", ""]
    md += [f"- [{'x' if c['held'] else ' '}] {name}: {c['why']}" for name, c in context.items()]
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    return {
        "main": main,
        "consistency": {m: r["systems"] for m, r in consistency.items()},
        "share_inconsistent": share,
        "oracle": oracle,
        "robustness": robustness,
        "rerank": {k: accuracies(t) for k, t in rerank.items()},
        "significance": {key: row["all"] for key, row in significance.items()},
        "checks": checks,
        "context": context,
    }
