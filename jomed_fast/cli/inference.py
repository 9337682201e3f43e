"""``predict``, ``evaluate`` and ``analyze``: from a trained reader + retriever to the paper's tables."""

from __future__ import annotations

import json
from pathlib import Path

from ..analysis.baselines import DEFAULT_K
from ..analysis.significance import DEFAULT_BOOTSTRAP
from ..infer.open_vqa import OPEN_FUSIONS
from ..infer.predict import RETRIEVAL_ALIASES, RETRIEVAL_MODES
from .common import (
    DATA_OPTS,
    INDEX_OPTS,
    READER_OPTS,
    load_reader_from,
    load_retrieval_from,
    load_samples_from,
    max_labels_from,
    task_from,
)
from .options import Command, Opt
from .rerank import LVLM_OPTS, LVLM_REPLIES, lvlm_backend, lvlm_inputs, write_rerank_table

PREDICT_OPTS = (
    *READER_OPTS,
    *DATA_OPTS,
    *INDEX_OPTS,
    Opt("out", str, None, "predictions JSONL (appended; a rerun from the same inputs resumes)", required=True),
    Opt(
        "query_encoder",
        str,
        None,
        "stage-2 query encoders (train-retriever's RUN_DIR/query_encoder)",
        default_doc="the index's --encoder embeds the queries",
    ),
    Opt("k_text", int, 2, "candidates from the text head"),
    Opt("k_image", int, 2, "candidates from the image head"),
    Opt("fusion", str, "paper", "fusion rule", choices=("paper", "reference")),
    Opt("tau", float, 1.0, "retrieval-score temperature of the paper fusion"),
    Opt("threshold", float, 0.5, "multi-label decision threshold"),
    Opt("batch_size", int, 4, "queries per scorer call"),
    Opt(
        "retrieval",
        str,
        "retrieved",
        "robustness mode: retrieved; none (no retrieval); random_records (random is the same): uniform "
        "index records, uniform weights; random_query: the authors' code's --random_query, each head's "
        "neighbours of a random normal query vector, weighted by their scores",
        choices=(*RETRIEVAL_MODES, *RETRIEVAL_ALIASES),
    ),
    Opt("query_image", bool, True, "put the query image in the prompt"),
    Opt("seed", int, 0, "seed of the random-retrieval mode"),
    Opt("max_new_tokens", int, 16, "greedy answer length limit (open VQA tasks)"),
    Opt(
        "open_fusion",
        str,
        "paper",
        "open VQA fusion: paper, the paper's marginal sum_k softmax(s)_k p(a | z_k, q) over the K generated "
        "answers; vote, this project's rule (summed weight x confidence per normalised answer)",
        choices=OPEN_FUSIONS,
    ),
    Opt(
        "allow_layout_mismatch",
        bool,
        False,
        "score with --layout even when the adapter's stage-1 run recorded another layout",
    ),
    Opt("progress", bool, True, "progress bar on stderr"),
)


def _predict_inputs(v: dict) -> dict:
    """The files and folders a predict run reads, by flag (an output must never be one of them)."""
    return {
        o.flag: v[o.name]
        for o in PREDICT_OPTS
        if o.name in ("samples", "index_records", "index", "reader", "adapter", "encoder", "query_encoder")
    }


def run_predict(v: dict) -> int:
    from ..identity import directory_digest
    from ..infer import InferConfig, check_inputs, check_output_free, predict, refuse_inputs_as_outputs
    from ..infer.output import lock_path, meta_path
    from ..scoring import CandidateScorer

    task = task_from(v)
    max_labels = max_labels_from(v, task)
    config = InferConfig(
        k_text=v["k_text"],
        k_image=v["k_image"],
        layout=v["layout"],
        fusion=v["fusion"],
        tau=v["tau"],
        threshold=v["threshold"],
        batch_size=v["batch_size"],
        retrieval=v["retrieval"],
        query_image=v["query_image"],
        seed=v["seed"],
        max_new_tokens=v["max_new_tokens"],
        open_fusion=v["open_fusion"],
        allow_layout_mismatch=v["allow_layout_mismatch"],
    )
    out = v["out"]
    refuse_inputs_as_outputs(
        {"--out": out, "--out's sidecar": meta_path(out), "--out's lock": lock_path(out)}, _predict_inputs(v)
    )
    check_output_free(out, "--out")
    # everything that can be refused is refused before the reader loads (it is the slow part)
    samples = load_samples_from(v, task)
    retrieval, encoder = load_retrieval_from(v) if v["retrieval"] != "none" else (None, None)
    if v["retrieval"] != "none" and retrieval is None:
        raise ValueError(f"--index: required with --retrieval {v['retrieval']} (or use --retrieval none)")
    inputs = {}
    if v["query_encoder"] is not None and encoder is not None:
        from ..retriever import load_head_encoders

        encoder = load_head_encoders(v["query_encoder"], encoder, trust_remote_code=v["trust_remote_code"])
        if v["retrieval"] == "retrieved":
            inputs["query_encoder"] = directory_digest(v["query_encoder"])
    check_inputs(config, retrieval, encoder)
    from ..infer import OpenAnswerer

    scorer: OpenAnswerer | CandidateScorer
    if task.is_open:  # no class set: greedy answers per candidate, fused over normalised strings
        scorer = OpenAnswerer(load_reader_from(v), task, v["layout"])
    else:
        scorer = CandidateScorer(load_reader_from(v), task, v["layout"], max_labels=max_labels)
    if retrieval is not None:
        retrieval.to(scorer.reader.device)  # search beside the reader: queries never round-trip via the CPU
    records = predict(
        scorer,
        samples,
        retrieval=retrieval,
        encoder=encoder,
        config=config,
        out_path=out,
        progress=v["progress"],
        inputs=inputs,
    )
    from ..eval import prediction_metrics

    summary = {"predictions": out, **prediction_metrics(records)}
    if retrieval is not None and config.retrieval == "retrieved":
        summary["excluded_self"] = retrieval.excluded.to_dict()  # this process's queries (a resume: the rest)
    print(json.dumps(summary, indent=1))
    return 0


EVALUATE_OPTS = (
    Opt("predictions", str, None, "predictions JSONL (jomed-fast predict)", required=True),
    Opt(
        "out", str, None, "write the metrics as JSON here (atomic; never one of the inputs)", default_doc="printed only"
    ),
)


def _predictions_inputs(flag: str, path: str) -> dict:
    """A predictions file and what lies beside it (its sidecar and lock), by name."""
    from ..infer.output import lock_path, meta_path

    return {flag: path, f"{flag}'s sidecar": meta_path(path), f"{flag}'s lock": lock_path(path)}


def run_evaluate(v: dict) -> int:
    from ..analysis import head_top1_metrics
    from ..data.io import atomic_write_json
    from ..eval import prediction_metrics
    from ..infer import read_predictions, refuse_inputs_as_outputs

    if v["out"]:
        refuse_inputs_as_outputs({"--out": v["out"]}, _predictions_inputs("--predictions", v["predictions"]))
    records = read_predictions(v["predictions"])
    result = {
        "fused": prediction_metrics(records),
        # per head: scores of different heads are not comparable (jomed_fast.analysis.head_top1)
        "top1_text": head_top1_metrics(records, "text"),
        "top1_image": head_top1_metrics(records, "image"),
    }
    if v["out"]:
        atomic_write_json(v["out"], result)
    print(json.dumps(result, indent=1))
    return 0


ANALYZE_OPTS = (
    Opt(
        "system",
        list,
        None,
        "NAME=PREDICTIONS.jsonl, one per system, each name once, all over the same "
        "queries (first: the split's reference, e.g. fine-tuned RAG after stage 1)",
        required=True,
    ),
    Opt(
        "split_from",
        str,
        None,
        "the system whose candidates fix the inconsistent split",
        default_doc="the first --system",
    ),
    Opt("out", str, None, "output directory for JSON, markdown and PNG", required=True),
    Opt(
        "task",
        str,
        None,
        "the task whose class names label the per-class chart (and whose labels the baselines read)",
        default_doc="class 0, class 1, ...",
    ),
    Opt("task_file", str, None, "the task as a YAML file of Task fields, in place of --task"),
    Opt(
        "baselines",
        bool,
        True,
        "the retrieval-only votes (kNN over --knn-from's candidates, each system's own candidates) as "
        "rows of the consistency tables, when --index-records (with labels) and --task are given",
    ),
    Opt(
        "knn_k",
        int,
        DEFAULT_K,
        "neighbours of the kNN vote (the paper's r = 4: 2 per head), the top by each head's retrieval softmax",
    ),
    Opt(
        "knn_from",
        str,
        None,
        "the system predicted with the base (un-fine-tuned) retriever, whose candidates the kNN vote reads",
        default_doc="the --split-from system",
    ),
    Opt("bootstrap", int, DEFAULT_BOOTSTRAP, "paired bootstrap resamples of the significance table"),
    Opt("seed", int, 0, "seed of the paired bootstrap"),
    *LVLM_OPTS,
)
ANALYSIS_TABLES = (
    "consistency_accuracy",
    "consistency_macro_f1",
    "consistency_split",
    "oracle",
    "significance",
    "rerank",
    "per_class_f1",
    "calibration",
)


def _system_paths(specs: list[str]) -> dict:
    """``{name: path}`` from ``NAME=PATH`` specs; a name given twice is an error."""
    out: dict = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--system: expected NAME=PATH, got {spec!r}")
        if name in out:
            raise ValueError(
                f"--system: the name {name!r} is given twice ({out[name]} and {path}); give each system its own name"
            )
        if not Path(path).is_file():
            raise ValueError(f"--system: {path} not found (for system {name!r})")
        out[name] = path
    return out


def _check_analysis_out(out: Path, paths: dict, lvlm_inputs: dict) -> None:
    """The output directory is a directory, and none of the tables written there is an input."""
    from ..infer import refuse_inputs_as_outputs

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} is a file; expected the output directory")
    outputs = {f"--out's {t}.{ext}": out / f"{t}.{ext}" for t in ANALYSIS_TABLES for ext in ("json", "md", "png")}
    outputs[f"--out's {LVLM_REPLIES}"] = out / LVLM_REPLIES
    inputs: dict = dict(lvlm_inputs)
    for name, path in paths.items():
        inputs.update(_predictions_inputs(f"--system {name}", path))
    refuse_inputs_as_outputs(outputs, inputs)


def run_analyze(v: dict) -> int:
    from ..analysis import check_same_queries, split_consistency, write_consistency_tables
    from ..infer import read_predictions

    paths = _system_paths(v["system"])
    ref = v["split_from"] or next(iter(paths))
    if ref not in paths:
        raise ValueError(f"--split-from: expected one of {sorted(paths)}, got {ref!r}")
    if v["lvlm_system"] is not None and v["lvlm_system"] not in paths:
        raise ValueError(f"--lvlm-system: expected one of {sorted(paths)}, got {v['lvlm_system']!r}")
    knn_from = v["knn_from"] or ref
    if knn_from not in paths:
        raise ValueError(f"--knn-from: expected one of {sorted(paths)}, got {knn_from!r}")
    if v["bootstrap"] < 1:
        raise ValueError(f"--bootstrap: expected at least 1 resample, got {v['bootstrap']}")
    out = Path(v["out"])
    _check_analysis_out(out, paths, lvlm_inputs(v))
    chat = lvlm_backend(v)
    systems = {name: read_predictions(path) for name, path in paths.items()}
    check_same_queries(systems)  # before anything is written
    task = task_from(v, default=None)
    classes = _classes(systems, task)
    baselines = _baselines(systems, v, knn_from, classes, task)  # refused before anything is written
    split = split_consistency(systems[ref])
    tables = write_consistency_tables(
        str(out),
        systems,
        split,
        None if classes is None else classes[0],
        extra={"split_from": ref},
        baselines=baselines,
    )
    for metric, m in tables.items():
        print(f"{metric} by split (inconsistent share {100 * m['share_inconsistent']:.1f}%, split from {ref}):")
        for name, row in m["systems"].items():
            print(f"  {name:<24}" + "  ".join(f"{k} {'-' if x is None else f'{100 * x:.1f}'}" for k, x in row.items()))
    if classes is not None:
        _write_oracle(out, systems, classes[0])
        _write_significance(out, systems, baselines, split, classes[0], v)
    write_rerank_table(out, systems, v, chat)
    if classes is not None:
        _write_class_analyses(out, systems, *classes)
    print(f"Table 8 (rerankers vs fusion and the oracle), per-class F1 and calibration written to {out}")
    return 0


def _classes(systems: dict, task) -> tuple[int, list | None] | None:
    """``(C, class names or None)`` of the predictions (``--task`` names them), or ``None`` for open VQA."""
    first = next(iter(systems.values()))
    if not first or first[0].kind == "vqa_open":
        return None
    if task is not None and task.kind != first[0].kind:
        raise ValueError(f"--task: expected a {first[0].kind} task (the predictions'), got {task.name} ({task.kind})")
    sizes = {len(r.fused_probs) for recs in systems.values() for r in recs if r.fused_probs}
    if task is not None:
        if sizes - {task.num_classes}:
            raise ValueError(
                f"--task: {task.name} has {task.num_classes} classes, the predictions' distributions {sorted(sizes)}"
            )
        return task.num_classes, list(task.label_names or task.labels)
    if len(sizes) == 1:
        return sizes.pop(), None
    raise ValueError(
        f"--system: the predictions' class distributions have {sorted(sizes) or 'no'} sizes; "
        "expected one (give --task to name the classes)"
    )


def _baselines(systems: dict, v: dict, knn_from: str, classes, task) -> dict:
    """The retrieval-only votes (``analysis.baselines``) by row name; none without ``--index-records``
    and ``--task`` (a note says so), with ``--no-baselines``, or for open VQA."""
    from ..analysis import index_labels, retrieval_baselines

    if not v["baselines"]:
        return {}
    if classes is None:
        print("baselines: none for open VQA (no label set to vote over)")
        return {}
    if v["index_records"] is None or task is None:
        print("baselines: none (give --index-records with labels and --task for the kNN and candidate votes)")
        return {}
    from ..data import load_index_records

    records = load_index_records(v["index_records"], verify_images="none")
    labels = index_labels(records, task, f"--index-records {v['index_records']}")
    if not labels:
        print(f"baselines: none (no record of {v['index_records']} carries a 'label', 'answer' or 'meta.label' key)")
        return {}
    out = retrieval_baselines(systems, labels, knn_from, v["knn_k"])
    print(f"baselines: kNN vote over the top {v['knn_k']} of {knn_from}'s candidates, each system's candidate vote")
    return out


def _write_oracle(out: Path, systems: dict, num_classes: int) -> None:
    """Table 1a's oracle (some candidate right): accuracy and F1 beside the fused answer's, printed too."""
    from ..analysis import oracle_accuracy, oracle_f1, write_analysis
    from ..analysis.baselines import retrieved
    from ..eval import prediction_metrics

    table = {}
    for name, recs in systems.items():
        if not retrieved(recs):  # a run without retrieval has no candidates to pick from
            continue
        fused = prediction_metrics(recs, num_classes)
        acc = fused.get("accuracy", fused.get("subset_accuracy"))
        table[name] = {
            "accuracy": acc,
            "oracle_accuracy": oracle_accuracy(recs),
            "macro_f1": fused["macro_f1"],
            "oracle_f1": oracle_f1(recs, num_classes),
        }
    if not table:
        return
    write_analysis(
        str(out),
        "oracle",
        table,
        title="Fused answer vs the oracle (some candidate right, Table 1a)",
        row_n={name: len(systems[name]) for name in table},
    )
    print("oracle (some candidate right; Table 1a):")
    for name, row in table.items():
        print(
            f"  {name:<24}oracle accuracy {100 * row['oracle_accuracy']:.1f}  oracle F1 {100 * row['oracle_f1']:.1f}"
            f"  (fused accuracy {100 * row['accuracy']:.1f}  macro-F1 {100 * row['macro_f1']:.1f})"
        )


def _write_significance(out: Path, systems: dict, baselines: dict, split: dict, num_classes: int, v: dict) -> None:
    """Every pair of systems and every system against every baseline: McNemar p and bootstrap intervals."""
    from ..analysis import significance_table, write_significance

    table = significance_table(systems, split, num_classes, baselines, n_boot=v["bootstrap"], seed=v["seed"])
    if not table:
        return
    write_significance(str(out), table, v["bootstrap"], v["seed"])
    print(f"paired significance (all queries; {v['bootstrap']} bootstrap resamples, seed {v['seed']}):")
    for key, row in table.items():
        c = row["all"]
        lo, hi = c["ci95_accuracy"]
        flo, fhi = c["ci95_macro_f1"]
        print(
            f"  {key:<40}accuracy {100 * c['diff_accuracy']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] "
            f"p={c['p_mcnemar']:.3g}  macro-F1 {100 * c['diff_macro_f1']:+.1f} [{100 * flo:+.1f}, {100 * fhi:+.1f}]"
        )


def _write_class_analyses(out: Path, systems: dict, num_classes: int, names: list | None) -> None:
    """Per-class F1 and the reliability diagram, for tasks with classes (open VQA has neither)."""
    from ..analysis import write_calibration, write_per_class_f1

    write_per_class_f1(str(out), systems, num_classes, names)
    write_calibration(str(out), systems)


COMMANDS = (
    Command(
        "predict",
        "retrieve, score, fuse and write predictions (JSONL)",
        "Inference: top-k per head, every candidate scored by the reader, fused; resumable.",
        PREDICT_OPTS,
        run_predict,
    ),
    Command(
        "evaluate",
        "metrics of a predictions file",
        "Accuracy / macro-F1 (or the kind's metrics) of the fused predictions and of each head's top-1 "
        "candidate alone (top1_text, top1_image: null for a head the predictions do not hold).",
        EVALUATE_OPTS,
        run_evaluate,
    ),
    Command(
        "analyze",
        "the paper's analyses over several systems' predictions",
        "Inconsistent vs consistent split (Tables 5-6, accuracy and macro-F1), with the retrieval-only "
        "baselines (a kNN vote over the base retriever's records, each system's candidate vote) as rows; "
        "the oracle's accuracy and F1 (Table 1a); paired significance of every difference (exact "
        "McNemar, bootstrap intervals); rerankers against fusion "
        "and the oracle (Table 8: each head's top-1 as evaluate reports it, the most confident candidate) "
        "on each system's inconsistent queries, with the consistent and all queries beside; JSON, "
        "markdown and PNG per table.",
        ANALYZE_OPTS,
        run_analyze,
    ),
)
