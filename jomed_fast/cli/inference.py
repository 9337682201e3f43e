"""``predict``, ``evaluate`` and ``analyze``: from a trained reader + retriever to the paper's tables."""

from __future__ import annotations

import json
from pathlib import Path

from ..infer.open_vqa import OPEN_FUSIONS
from ..infer.predict import RETRIEVAL_ALIASES, RETRIEVAL_MODES
from .common import (
    DATA_OPTS,
    INDEX_OPTS,
    READER_OPTS,
    load_reader_from,
    load_retrieval_from,
    load_samples_from,
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
    from ..tasks import get_task

    task = get_task(v["task"])
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
        scorer = CandidateScorer(load_reader_from(v), task, v["layout"])
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
        "the task whose class names label the per-class chart",
        default_doc="class 0, class 1, ...",
    ),
    *LVLM_OPTS,
)
ANALYSIS_TABLES = (
    "consistency_accuracy",
    "consistency_macro_f1",
    "consistency_split",
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
    out = Path(v["out"])
    _check_analysis_out(out, paths, lvlm_inputs(v))
    chat = lvlm_backend(v)
    systems = {name: read_predictions(path) for name, path in paths.items()}
    check_same_queries(systems)  # before anything is written
    tables = write_consistency_tables(str(out), systems, split_consistency(systems[ref]), extra={"split_from": ref})
    for metric, m in tables.items():
        print(f"{metric} by split (inconsistent share {100 * m['share_inconsistent']:.1f}%, split from {ref}):")
        for name, row in m["systems"].items():
            print(f"  {name:<24}" + "  ".join(f"{k} {'-' if x is None else f'{100 * x:.1f}'}" for k, x in row.items()))
    write_rerank_table(out, systems, v, chat)
    _write_class_analyses(out, systems, v["task"])
    print(f"Table 8 (rerankers vs fusion and the oracle), per-class F1 and calibration written to {out}")
    return 0


def _write_class_analyses(out: Path, systems: dict, task_name: str | None) -> None:
    """Per-class F1 and the reliability diagram, for tasks with classes (open VQA has neither)."""
    from ..analysis import write_calibration, write_per_class_f1
    from ..tasks import get_task

    first = next(iter(systems.values()))
    if not first or first[0].kind == "vqa_open":
        return
    task = get_task(task_name) if task_name is not None else None
    if task is not None and task.kind != first[0].kind:
        raise ValueError(f"--task: expected a {first[0].kind} task (the predictions'), got {task.name} ({task.kind})")
    sizes = {len(r.fused_probs) for recs in systems.values() for r in recs if r.fused_probs}
    if task is not None:
        if sizes - {task.num_classes}:
            raise ValueError(
                f"--task: {task.name} has {task.num_classes} classes, the predictions' distributions {sorted(sizes)}"
            )
        num_classes, names = task.num_classes, list(task.label_names or task.labels)
    elif len(sizes) == 1:
        num_classes, names = sizes.pop(), None
    else:
        raise ValueError(
            f"--system: the predictions' class distributions have {sorted(sizes) or 'no'} sizes; "
            "expected one (give --task to name the classes)"
        )
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
        "Inconsistent vs consistent split (Tables 5-6, accuracy and macro-F1); rerankers against fusion "
        "and the oracle (Table 8: each head's top-1 as evaluate reports it, the most confident candidate) "
        "on each system's inconsistent queries, with the consistent and all queries beside; JSON, "
        "markdown and PNG per table.",
        ANALYZE_OPTS,
        run_analyze,
    ),
)
