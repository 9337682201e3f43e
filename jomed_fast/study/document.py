"""The study's document: ``study.md`` (every table, per seed, and what holds and what does not),
``study.png`` (every row's accuracy and macro-F1 per seed, with intervals) and ``study.json``
(the aggregate of ``study.summary``), written side by side.

Every statement of "What holds" is computed from the aggregate by the rules of
:func:`statements`: a finding holds on a seed when its difference is positive at McNemar
p < ``summary.ALPHA``; the count of such seeds is what is stated.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..analysis.figures import _new_figure, display_name, save_png
from ..data.io import atomic_write_json, atomic_write_text
from .config import StudyConfig
from .summary import ALPHA

__all__ = ["statements", "write_document"]

BASELINES = ("knn_vote", "pixel_logreg", "small_cnn", "majority")
# the target's entropy over log K above this: near-flat, the reader barely prefers any candidate
FLAT = 0.95
_ROW_NAMES = {
    "knn_vote": "kNN vote (base retriever's top {k})",
    "jomed_candidate_vote": "vote of JOMED's candidates",
    "pixel_logreg": "logistic regression on pixels",
    "small_cnn": "small CNN",
    "majority": "majority class",
}


def _name(row: str, k: int) -> str:
    return _ROW_NAMES[row].format(k=k) if row in _ROW_NAMES else display_name(row)


def _pct(x: float | None, signed: bool = False) -> str:
    """Percent with one decimal. Shares of 400 or 156 queries land on exact halves of the last
    digit (0.25 points), so the value is rounded to 9 decimals first: float noise of 1e-16 from
    the order of a sum must not flip how a half rounds."""
    if x is None:
        return "-"
    v = round(100 * x, 9)
    return f"{v:+.1f}" if signed else f"{v:.1f}"


def _mean_sd(cell: Mapping, signed: bool = False) -> str:
    sd = "" if cell["sd"] is None else f" ± {100 * cell['sd']:.1f}"
    return _pct(cell["mean"], signed) + sd


def _interval(cell: Mapping) -> str:
    return f"{_pct(cell['value'])} [{_pct(cell['ci'][0])}, {_pct(cell['ci'][1])}]"


def _systems_table(agg: Mapping) -> list[str]:
    seeds = agg["seeds"]
    head = "| row | accuracy, mean ± sd | " + " | ".join(f"seed {s}: accuracy [95% CI]" for s in seeds)
    head += " | macro-F1, mean ± sd | " + " | ".join(f"seed {s}: macro-F1 [95% CI]" for s in seeds) + " |"
    lines = [head, "|---|" + "---:|" * (2 + 2 * len(seeds))]
    for row, cell in agg["systems"].items():
        acc, f1 = cell["accuracy"], cell["macro_f1"]
        lines.append(
            f"| {_name(row, agg['knn_k'])} | {_mean_sd(acc)} | "
            + " | ".join(_interval(c) for c in acc["seeds"])
            + f" | {_mean_sd(f1)} | "
            + " | ".join(_interval(c) for c in f1["seeds"])
            + " |"
        )
    return lines


def _comparison_cell(c: Mapping | None) -> str:
    if c is None:
        return "-"
    lo, hi = c["ci95_accuracy"]
    return f"{_pct(c['diff_accuracy'], True)} [{_pct(lo, True)}, {_pct(hi, True)}], p = {c['p_mcnemar']:.3g}"


def _split_name(key: str, k: int) -> str:
    b, a = key.split(" vs ")
    return f"{_name(b, k)} − {_name(a, k)}"


def _comparisons_table(agg: Mapping, part: str = "all") -> list[str]:
    seeds = agg["seeds"]
    lines = [
        "| difference (accuracy, points) | mean | "
        + " | ".join(f"seed {s}: Δ [95% CI], McNemar p" for s in seeds)
        + f" | seeds with a gain at p < {ALPHA:g} | with a loss |",
        "|---|---:|" + "---:|" * len(seeds) + "---:|---:|",
    ]
    for key, parts in agg["comparisons"].items():
        p = parts[part]
        mean = "-" if p["diff_accuracy"] is None else _mean_sd(p["diff_accuracy"], True)
        lines.append(
            f"| {_split_name(key, agg['knn_k'])} | {mean} | "
            + " | ".join(_comparison_cell(c) for c in p["seeds"])
            + f" | {p['significant_gain']} | {p['significant_loss']} |"
        )
    return lines


def _consistency_table(agg: Mapping) -> list[str]:
    seeds = agg["seeds"]
    key = "jomed vs ft_rag"
    lines = [
        "| seed | inconsistent share | JOMED − fine-tuned RAG, inconsistent | consistent |",
        "|---|---:|---:|---:|",
    ]
    for i, s in enumerate(seeds):
        parts = agg["comparisons"][key]
        lines.append(
            f"| {s} | {_pct(agg['share_inconsistent'][i])} | "
            f"{_comparison_cell(parts['inconsistent']['seeds'][i])} | {_comparison_cell(parts['consistent']['seeds'][i])} |"
        )
    return lines


def _changed_table(agg: Mapping) -> list[str]:
    seeds = agg["seeds"]
    rows = list(agg["answer_changed"][0])
    lines = [
        "| JOMED's answer changed, share of test queries | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|" + "---:|" * len(seeds),
    ]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(_pct(c[row]) for c in agg["answer_changed"]) + " |")
    return lines


def _robustness_table(agg: Mapping, reader_only: Sequence[float]) -> list[str]:
    seeds = agg["seeds"]
    lines = [
        "| row (accuracy) | mean ± sd | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|---:|" + "---:|" * len(seeds),
        f"| reader only (for reference) | {_mean_sd({'mean': float(np.mean(reader_only)), 'sd': None})} | "
        + " | ".join(_pct(v) for v in reader_only)
        + " |",
    ]
    for row, cell in agg["robustness"].items():
        acc = cell["accuracy"]
        lines.append(f"| {display_name(row)} | {_mean_sd(acc)} | " + " | ".join(_pct(v) for v in acc["seeds"]) + " |")
    return lines


def _epoch_means(head: Mapping, field: str) -> float | None:
    values = [e[field] for e in head["epochs"] if e[field] is not None]
    return float(np.mean(values)) if values else None


def _stage2_table(agg: Mapping) -> list[str]:
    lines = [
        "| seed | head | epoch kept (0: base) | val. accuracy before → kept | target entropy / log K | "
        "reader-right share | distinct val. records before → last epoch | warnings |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for seed, heads in zip(agg["seeds"], agg["stage2"]):
        for name, h in heads.items():
            last = h["epochs"][-1]["val_distinct_records"] if h["epochs"] else None
            lines.append(
                f"| {seed} | {name} | {h['selected_epoch']} | {_pct(h['val_system_accuracy_before'])} → "
                f"{_pct(h['val_system_accuracy_selected'])} | {_epoch_means(h, 'target_entropy_share'):.3f} | "
                f"{_pct(_epoch_means(h, 'reader_right_share'))} | {h['val_distinct_records_before']} → {last} | "
                f"{', '.join(h['warnings']) or '-'} |"
            )
    return lines


def _gain_line(agg: Mapping, key: str, what: str) -> str:
    p = agg["comparisons"][key]["all"]
    n = len(agg["seeds"])
    per_seed = ", ".join(_pct(c["diff_accuracy"], True) for c in p["seeds"])
    return (
        f"{what}: {p['significant_gain']} of {n} seeds show a gain at p < {ALPHA:g}, "
        f"{p['significant_loss']} a loss (accuracy difference per seed: {per_seed} points)."
    )


def _head_cell(h: Mapping) -> str:
    flat = _epoch_means(h, "target_entropy_share")
    flat_text = "-" if flat is None else f"{flat:.3f}"
    return f"{h['selected_epoch']}; {flat_text}; {', '.join(h['warnings']) or '-'}"


def _why_no_gain(agg: Mapping) -> list[str]:
    """For the seeds where JOMED's gain over fine-tuned RAG is not significant: what stage 2's
    diagnostics show (counted over those seeds), and a row per seed."""
    comparisons = agg["comparisons"]["jomed vs ft_rag"]["all"]["seeds"]
    rows = [i for i, c in enumerate(comparisons) if not (c["p_mcnemar"] < ALPHA and c["diff_accuracy"] > 0)]
    if not rows:
        return ["- (none: the gain is significant on every seed)"]
    heads = list(agg["stage2"][rows[0]])

    def flat(i: int, head: str) -> bool:
        share = _epoch_means(agg["stage2"][i][head], "target_entropy_share")
        return share is not None and share > FLAT

    kept = {h: sum(agg["stage2"][i][h]["selected_epoch"] == 0 for i in rows) for h in heads}
    changed = [agg["answer_changed"][i]["random retrieval"] for i in rows]
    lines = [
        f"- On {sum(all(flat(i, h) for h in heads) for i in rows)} of these {len(rows)} seeds every head's "
        f"target was near-flat (its entropy above {FLAT} of log K on average over the epochs): the reader's "
        "posterior barely differs between the candidates, so the KL has little to teach.",
        "- Validation kept the base weights (epoch 0: the head retrieves what fine-tuned RAG's does) for "
        + ", ".join(f"the {h} head on {kept[h]}" for h in heads)
        + " of them.",
        f"- Random records in place of the retrieved ones changed the reader's answer on {_pct(min(changed))}"
        f"-{_pct(max(changed))}% of the test queries on these seeds.",
        "",
        "| seed | JOMED − fine-tuned RAG (McNemar p) | answer changed by random records | "
        + " | ".join(f"{h} head: epoch kept; target entropy / log K; warnings" for h in heads)
        + " |",
        "|---|---:|---:|" + "---|" * len(heads),
    ]
    for i in rows:
        c = comparisons[i]
        lines.append(
            f"| {agg['seeds'][i]} | {_pct(c['diff_accuracy'], True)} ({c['p_mcnemar']:.3g}) | "
            f"{_pct(agg['answer_changed'][i]['random retrieval'])} | "
            + " | ".join(_head_cell(agg["stage2"][i][h]) for h in heads)
            + " |"
        )
    return lines


def statements(agg: Mapping) -> list[str]:
    """What holds and what does not on one dataset, each a markdown bullet computed from ``agg``."""
    n = len(agg["seeds"])
    systems = agg["systems"]
    best = max(BASELINES, key=lambda b: systems[b]["accuracy"]["mean"])
    ro = [c["value"] for c in systems["reader_only"]["accuracy"]["seeds"]]
    random_rows = agg["robustness"]["random retrieval"]["accuracy"]["seeds"]
    majority = [c["value"] for c in systems["majority"]["accuracy"]["seeds"]]
    no_image = agg["robustness"]["no query image"]["accuracy"]["seeds"]
    knn = [c["value"] for c in systems["knn_vote"]["accuracy"]["seeds"]]

    def changed(row: str) -> float:
        return float(np.mean([c[row] for c in agg["answer_changed"]]))

    split = agg["comparisons"]["jomed vs ft_rag"]
    both = [
        (a, b)
        for a, b in zip(split["inconsistent"]["seeds"], split["consistent"]["seeds"])
        if a is not None and b is not None
    ]
    larger = sum(1 for a, b in both if a["diff_accuracy"] > b["diff_accuracy"])
    lines = [
        "- " + _gain_line(agg, "jomed vs ft_rag", "JOMED over fine-tuned RAG (the paper's main finding)"),
        "- " + _gain_line(agg, "ft_rag vs reader_only", "Fine-tuned RAG over reader-only"),
        "- "
        + _gain_line(
            agg,
            f"jomed vs {best}",
            f"JOMED over the strongest baseline by mean accuracy, {_name(best, agg['knn_k'])} "
            f"({_mean_sd(systems[best]['accuracy'])} against JOMED's {_mean_sd(systems['jomed']['accuracy'])})",
        ),
        f"- JOMED's gain over fine-tuned RAG is larger on the inconsistent split than on the consistent one "
        f"on {larger} of the {len(both)} seeds with both splits non-empty (the paper: larger on every dataset).",
        f"- Random retrieval at or above reader-only (the paper's Table 7): {sum(r >= o for r, o in zip(random_rows, ro))} "
        f"of {n} seeds.",
        f"- JOMED without the query image at or above the majority class: "
        f"{sum(a >= m for a, m in zip(no_image, majority))} of {n} seeds.",
        f"- How much the answer depends on the context: random records in place of the retrieved ones changed "
        f"JOMED's answer on {_pct(changed('random retrieval'))}% of the test queries on average, no retrieval on "
        f"{_pct(changed('no retrieval'))}%, removing the query image on {_pct(changed('no query image'))}%.",
        f"- What the retrieved captions are worth: the kNN vote of the base retriever's top {agg['knn_k']} is "
        f"below the majority class on {sum(k < m for k, m in zip(knn, majority))} of {n} seeds "
        f"({_mean_sd(systems['knn_vote']['accuracy'])} against {_mean_sd(systems['majority']['accuracy'])}).",
    ]
    return lines


def _figure(agg_all: Mapping, path: Path) -> None:
    datasets = list(agg_all)
    fig = _new_figure(5.5 * len(datasets), 7.5)
    axes = np.atleast_2d(fig.subplots(2, len(datasets), squeeze=False))
    for j, dataset in enumerate(datasets):
        agg = agg_all[dataset]
        rows = list(agg["systems"])
        for i, metric in enumerate(("accuracy", "macro_f1")):
            ax = axes[i, j]
            means = [100 * agg["systems"][r][metric]["mean"] for r in rows]
            x = np.arange(len(rows))
            ax.bar(x, means, 0.7, color="0.85", label="mean over seeds")
            for s, seed in enumerate(agg["seeds"]):
                off = (s - (len(agg["seeds"]) - 1) / 2) * 0.15
                cells = [agg["systems"][r][metric]["seeds"][s] for r in rows]
                v = np.array([100 * c["value"] for c in cells])
                lo = v - np.array([100 * c["ci"][0] for c in cells])
                hi = np.array([100 * c["ci"][1] for c in cells]) - v
                ax.errorbar(x + off, v, yerr=[lo, hi], fmt="o", ms=3, lw=0.8, capsize=2, label=f"seed {seed} (95% CI)")
            for xi, m in zip(x, means):
                ax.text(xi, 1, f"{m:.1f}", ha="center", va="bottom", fontsize=7)
            ax.set_xticks(x, [_name(r, agg["knn_k"]) for r in rows], rotation=35, ha="right", fontsize=7)
            ax.set_ylim(0, 100)
            ax.set_ylabel(f"{display_name(metric)} (%)")
            ax.set_title(f"{dataset}: {display_name(metric)} (n={agg['queries']} test queries)", fontsize=9)
            ax.spines[["top", "right"]].set_visible(False)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    save_png(fig, path)


def _setup(config: StudyConfig, agg_all: Mapping) -> list[str]:
    r = config.recipe
    counts = "; ".join(
        f"{d}: {a['counts']['index']} index records, {a['counts']['train']} training, {a['counts']['val']} "
        f"validation and {a['counts']['test']} test queries"
        for d, a in agg_all.items()
    )
    return [
        f"Data: the MedMNIST files of `{config.data_dir}` (28×28; BreastMNIST: malignant vs normal/benign, "
        f"RetinaMNIST: diabetic-retinopathy grade 0-4), official splits. A seeded, stratified "
        f"{100 * config.index_fraction:g}% of each training split became index records captioned "
        f"`{config.caption_template}` (`{{label}}`: the class's name); the rest are the training queries, the "
        f"official validation and test splits the selection and test queries. {counts}. The index and the "
        "queries share no sample, and leave-self-out retrieval is on. The MedPix-2.0 subset's captions describe "
        "CT and MR images, neither ultrasound nor fundus photographs, so they are not in these indexes.",
        "",
        f"Models and recipe: the demo's tiny {r.arch} reader from random weights and its tiny CLIP retriever, "
        f"pre-trained contrastively on the index's pairs for {r.retriever.epochs} epochs; stage 1 (LoRA r "
        f"{r.stage1.lora_r}, lr {r.stage1.lr:g}; {r.stage1.epochs} epochs with retrieval, {r.stage1.reader_only_epochs} "
        f"without) with the class-weighted answer loss `{config.class_weights}` and checkpoints kept by "
        f"validation `{config.select_by}`; stage 2 on {r.stage2.queries} training queries, K = {r.stage2.k}, "
        f"{r.stage2.epochs} epochs per head, each head's epoch kept by fused validation accuracy; inference fuses "
        f"{r.inference.k_text} text + {r.inference.k_image} image candidates, `{r.layout}` layout. Seeds "
        f"{', '.join(map(str, config.seeds))}: a seed draws the index split, every model's initial weights and the "
        "data order.",
        "",
        "Baselines: the kNN vote of the base retriever's top candidates' labels and the vote of JOMED's own "
        "candidates (`jomed_fast.analysis.baselines`); logistic regression on the pixels and a small CNN trained on all of "
        "the training split's labelled images (index records included) and selected on validation macro-F1 "
        "(`jomed_fast.study.supervised`); the training split's majority class. Those three see the same images on every "
        "seed (a seed only moves images between index and queries), so the deterministic ones, logistic "
        "regression and the majority class, are the same on every seed; the CNN's seed draws its weights.",
        "",
        "What this is not: the paper's readers are 7B-12B LVLMs pre-trained on images and text; these readers "
        "start from random weights and see 28-pixel images, and a label-derived caption makes a text candidate "
        "a label. The study measures what the toolkit's pipeline does on real images at this scale, beside the "
        "baselines a reviewer would ask for; it is not a test of the paper's claims at the paper's scale.",
    ]


def source_commit() -> str:
    """The checkout's commit (short hash, ``+ local changes`` when the tree differs), or a note
    that the package is not in a git checkout."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=30, check=True)
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ":/jomed_fast", ":/kernels", ":/csrc")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"`{commit}`" + (" + local changes" if dirty else "")


def write_document(path, agg_all: Mapping, config: StudyConfig) -> Path:
    """``path`` (``.md``) with ``.png`` and ``.json`` beside it; returns ``path``."""
    md_path = Path(path)
    png, js = md_path.with_suffix(".png"), md_path.with_suffix(".json")
    atomic_write_json(js, agg_all)
    _figure(agg_all, png)
    lines = [
        "# The JOMED pipeline on real data: " + " and ".join(agg_all),
        "",
        f"Generated by `make study` (`jomed-fast study`, `jomed_fast.study`) at commit {source_commit()}; every "
        "figure below is read from its runs. "
        "Percent, one decimal; intervals are 95% percentile bootstraps over the test queries "
        f'(2000 resamples); p is the exact McNemar test; "significant" means p < {ALPHA:g}.',
        "",
        *_setup(config, agg_all),
        "",
        f"![every row's accuracy and macro-F1 per seed]({png.name})",
        "",
    ]
    for dataset, agg in agg_all.items():
        reader_only = [c["value"] for c in agg["systems"]["reader_only"]["accuracy"]["seeds"]]
        lines += [
            f"## {dataset}",
            "",
            "### What holds and what does not",
            "",
            *statements(agg),
            "",
            "Where JOMED's gain over fine-tuned RAG is not significant, stage 2's diagnostics say why:",
            "",
            *(_why_no_gain(agg) or ["- (none: the gain is significant on every seed)"]),
            "",
            "### Systems and baselines (test split)",
            "",
            *_systems_table(agg),
            "",
            "### Paired differences, all test queries",
            "",
            *_comparisons_table(agg),
            "",
            "### The consistency split (Tables 5-6): fine-tuned RAG's candidates agree or not",
            "",
            *_consistency_table(agg),
            "",
            "### Robustness (Table 7): JOMED's reader and retriever under changed inputs",
            "",
            *_robustness_table(agg, reader_only),
            "",
            *_changed_table(agg),
            "",
            "### Stage 2's diagnostics (per head; means over the epochs trained)",
            "",
            *_stage2_table(agg),
            "",
        ]
    atomic_write_text(md_path, "\n".join(lines))
    return md_path
