"""One study run (a dataset and a seed) and the loop over all of them.

A run's folder ``out/<dataset>/seed<k>`` holds ``study_config.json`` (its settings: a rerun with
other ones is refused), ``data/`` (``study.data``), the demo pipeline's steps (a complete step is
skipped on a rerun), ``report/`` (the demo's per-run tables on this task), ``supervised.json``
(the supervised baselines' test answers) and ``run_summary.json``, what ``study.summary``
aggregates over seeds:

* ``systems``: accuracy and macro-F1 of every system and baseline with its 95% bootstrap interval
  over the test queries (``analysis.significance.bootstrap_interval``);
* ``comparisons``: the paired differences the study states (JOMED against fine-tuned RAG,
  reader-only and each baseline; fine-tuned RAG against reader-only), McNemar's p and the paired
  bootstrap intervals, on all queries and per consistency split;
* ``consistency``: the share of inconsistent queries and every system's accuracy per split;
* ``robustness``: Table 7's rows, and ``answer_changed``: the share of test queries whose fused
  answer differs from JOMED's under each of them (how much the reader's answer depends on what
  it is shown);
* ``stage2``: per head, the selected epoch and the diagnostics of every epoch (``study.stage2``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..analysis import index_labels, retrieval_baselines, split_consistency
from ..analysis.baselines import DEFAULT_K
from ..analysis.significance import bootstrap_interval, compare_paired
from ..data.io import atomic_write_json
from ..demo.pipeline import check_run_settings, run_systems
from ..demo.report import write_report
from .config import DATASETS, StudyConfig
from .data import StudyData, file_sha256, prepare_dataset
from .stage2 import stage2_digest
from .supervised import images_array, pixel_logreg, small_cnn

__all__ = ["COMPARISONS", "SYSTEM_ROWS", "VARIANTS", "answer_changed", "run_one", "run_study"]

# the rows of the study's tables: the pipeline's systems, then the baselines
SYSTEM_ROWS = (
    "reader_only",
    "ft_rag",
    "jomed",
    "knn_vote",
    "jomed_candidate_vote",
    "pixel_logreg",
    "small_cnn",
    "majority",
)
# (A, B): B - A is stated with its paired test
COMPARISONS = (
    ("ft_rag", "jomed"),
    ("reader_only", "jomed"),
    ("reader_only", "ft_rag"),
    ("knn_vote", "jomed"),
    ("pixel_logreg", "jomed"),
    ("small_cnn", "jomed"),
    ("majority", "jomed"),
)
N_BOOT = 2000


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _answered(records, answers: Mapping[str, int]) -> list:
    """Copies of ``records`` answered ``answers[query id]``, without candidates."""
    return [dataclasses.replace(r, candidates=[], fused=int(answers[r.query_id]), fused_probs=None) for r in records]


def _supervised(out: Path, ds: StudyData, config: StudyConfig, seed: int, progress: bool) -> dict:
    """``{baseline: {query id: answer}}`` of the supervised baselines and the training majority."""
    path = out / "supervised.json"
    if path.exists():
        return json.loads(path.read_text())
    _log("supervised baselines: pixel logistic regression, small CNN", progress)
    labels = index_labels(ds.index, ds.task)
    train_images = [s.load_image() for s in ds.train] + [r.load_image() for r in ds.index]
    train_y = np.array([int(s.label) for s in ds.train] + [int(labels[r.id]) for r in ds.index])
    val_y = np.array([int(s.label) for s in ds.val])
    x, vx, tx = (
        images_array(a) for a in (train_images, [s.load_image() for s in ds.val], [s.load_image() for s in ds.test])
    )
    c = ds.task.num_classes
    fits = {
        "pixel_logreg": pixel_logreg(x, train_y, vx, val_y, tx, c, seed=seed),
        "small_cnn": small_cnn(x, train_y, vx, val_y, tx, c, epochs=config.cnn_epochs, seed=seed),
    }
    majority = int(np.bincount(train_y, minlength=c).argmax())
    ids = [s.id for s in ds.test]
    result: dict[str, dict] = {name: dict(zip(ids, map(int, fit["test"]))) for name, fit in fits.items()}
    result["majority"] = {i: majority for i in ids}
    result["selected"] = {name: {**fit["selected"], "val_macro_f1": fit["val"][0]} for name, fit in fits.items()}
    atomic_write_json(path, result)
    return result


# Table 7's variants: the prediction files of ``demo.pipeline.SYSTEMS`` behind each row
VARIANTS = {
    "no retrieval": "jomed_no_retrieval",
    "random retrieval": "jomed_random_retrieval",
    "no query image": "jomed_no_query_image",
}


def answer_changed(records: dict) -> dict:
    """``{variant: share of queries whose fused answer differs from JOMED's}`` (matched by id)."""
    jomed = {r.query_id: r.fused for r in records["jomed"]}
    return {
        row: sum(r.fused != jomed[r.query_id] for r in records[name]) / len(records[name])
        for row, name in VARIANTS.items()
    }


def _comparison(a, b, keep: set | None, c: int, seed: int) -> dict | None:
    ra = [r for r in a if keep is None or r.query_id in keep]
    rb = [r for r in b if keep is None or r.query_id in keep]
    return compare_paired(ra, rb, c, n_boot=N_BOOT, seed=seed) if ra else None


def _summarise(records: dict, ds: StudyData, supervised: dict, report: dict, out: Path, seed: int) -> dict:
    c = ds.task.num_classes
    labels = index_labels(ds.index, ds.task)
    systems = {k: records[k] for k in ("reader_only", "ft_rag", "jomed")}
    k = min(DEFAULT_K, *(len(r.candidates) for r in records["ft_rag"]))
    votes = retrieval_baselines(systems, labels, "ft_rag", k)
    rows = {
        **systems,
        "knn_vote": votes[f"knn{k}_vote"],
        "jomed_candidate_vote": votes["jomed_candidate_vote"],
        **{name: _answered(records["jomed"], supervised[name]) for name in ("pixel_logreg", "small_cnn", "majority")},
    }
    split = split_consistency(records["ft_rag"])
    return {
        "seed": seed,
        "queries": len(records["jomed"]),
        "counts": {"train": len(ds.train), "val": len(ds.val), "test": len(ds.test), "index": len(ds.index)},
        "knn_k": k,
        "systems": {name: bootstrap_interval(rows[name], c, n_boot=N_BOOT, seed=seed) for name in SYSTEM_ROWS},
        "comparisons": {
            f"{b} vs {a}": {
                part: _comparison(rows[a], rows[b], None if part == "all" else split[part], c, seed)
                for part in ("all", "inconsistent", "consistent")
            }
            for a, b in COMPARISONS
        },
        "consistency": {"share_inconsistent": report["share_inconsistent"], **report["consistency"]},
        "robustness": report["robustness"],
        "answer_changed": answer_changed(records),
        "oracle": report["oracle"],
        "supervised_selected": supervised["selected"],
        "stage2": stage2_digest(out / "stage2"),
    }


def run_one(out_dir, config: StudyConfig, dataset: str, seed: int, *, progress: bool = True) -> dict:
    """Run (or resume) one dataset and seed in ``out_dir``; returns its ``run_summary.json``."""
    out = Path(out_dir)
    file_name, task_name = DATASETS[dataset]
    src = Path(config.data_dir) / file_name
    if not src.is_file():
        raise FileNotFoundError(f"--data-dir: {src} not found (the study reads {file_name} from {config.data_dir})")
    check_run_settings(out, config.run_settings(dataset, seed, file_sha256(src)), "study_config.json")
    summary_path = out / "run_summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    _log(f"{dataset}, seed {seed}", progress)
    recipe = config.recipe.replace(seed=seed)
    torch.manual_seed(seed)
    ds = prepare_dataset(
        src,
        out / "data",
        task_name,
        fraction=config.index_fraction,
        seed=seed,
        template=config.caption_template,
        limit=config.limit,
    )
    records = run_systems(
        out, recipe, ds, image_size=ds.image_size, reader_options=config.reader_options(), progress=progress
    )
    report = write_report(
        out / "report",
        records,
        ds.task.num_classes,
        seed=seed,
        findings_asserted=recipe.asserts_findings,
        class_names=ds.task.labels,
        index_labels=index_labels(ds.index, ds.task),
        task_name=f"{dataset} (seed {seed})",
    )
    supervised = _supervised(out, ds, config, seed, progress)
    summary = _summarise(records, ds, supervised, report, out, seed)
    atomic_write_json(summary_path, summary)
    return summary


def run_study(out_dir, config: StudyConfig, *, progress: bool = True) -> dict:
    """Every dataset and seed of ``config`` under ``out_dir``: ``{dataset: [run summary per seed]}``."""
    out = Path(out_dir)
    return {
        dataset: [
            run_one(out / dataset / f"seed{seed}", config, dataset, seed, progress=progress) for seed in config.seeds
        ]
        for dataset in config.datasets
    }
