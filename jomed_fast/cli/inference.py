"""``predict``, ``evaluate`` and ``analyze``: from a trained reader + retriever to the paper's tables."""

from __future__ import annotations

import json
from pathlib import Path

from .common import (
    DATA_OPTS,
    INDEX_OPTS,
    READER_OPTS,
    load_reader_from,
    load_retrieval_from,
    load_samples_from,
)
from .options import Command, Opt

PREDICT_OPTS = (*READER_OPTS, *DATA_OPTS, *INDEX_OPTS,
                Opt("out", str, None, "predictions JSONL (appended; a rerun resumes)", required=True),
                Opt("query_encoder", str, None, "stage-2 query encoders (train-retriever's RUN_DIR/query_encoder)",
                    default_doc="the index's --encoder embeds the queries"),
                Opt("k_text", int, 2, "candidates from the text head"),
                Opt("k_image", int, 2, "candidates from the image head"),
                Opt("fusion", str, "paper", "fusion rule", choices=("paper", "reference")),
                Opt("tau", float, 1.0, "retrieval-score temperature of the paper fusion"),
                Opt("threshold", float, 0.5, "multi-label decision threshold"),
                Opt("batch_size", int, 4, "queries per scorer call"),
                Opt("retrieval", str, "retrieved", "robustness mode", choices=("retrieved", "none", "random")),
                Opt("query_image", bool, True, "put the query image in the prompt"),
                Opt("seed", int, 0, "seed of the random-retrieval mode"),
                Opt("max_new_tokens", int, 16, "greedy answer length limit (open VQA tasks)"),
                Opt("progress", bool, True, "progress bar on stderr"))


def run_predict(v: dict) -> int:
    from ..infer import InferConfig, predict
    from ..scoring import CandidateScorer
    from ..tasks import get_task

    task = get_task(v["task"])
    config = InferConfig(k_text=v["k_text"], k_image=v["k_image"], layout=v["layout"], fusion=v["fusion"],
                         tau=v["tau"], threshold=v["threshold"], batch_size=v["batch_size"],
                         retrieval=v["retrieval"], query_image=v["query_image"], seed=v["seed"],
                         max_new_tokens=v["max_new_tokens"])
    samples = load_samples_from(v, task)
    retrieval, encoder = load_retrieval_from(v) if v["retrieval"] != "none" else (None, None)
    if v["retrieval"] != "none" and retrieval is None:
        raise ValueError(f"--index: required with --retrieval {v['retrieval']} (or use --retrieval none)")
    if v["query_encoder"] is not None and encoder is not None:
        from ..retriever import load_head_encoders

        encoder = load_head_encoders(v["query_encoder"], encoder, trust_remote_code=v["trust_remote_code"])
    if task.is_open:  # no class set: greedy answers per candidate, fused over normalised strings
        from ..infer import OpenAnswerer

        scorer = OpenAnswerer(load_reader_from(v), task, v["layout"])
    else:
        scorer = CandidateScorer(load_reader_from(v), task, v["layout"])
    records = predict(scorer, samples, retrieval=retrieval, encoder=encoder, config=config, out_path=v["out"],
                      progress=v["progress"])
    from ..eval import prediction_metrics

    print(json.dumps({"predictions": v["out"], **prediction_metrics(records)}, indent=1))
    return 0


EVALUATE_OPTS = (Opt("predictions", str, None, "predictions JSONL (jomed-fast predict)", required=True),
                 Opt("out", str, None, "write the metrics as JSON here (atomic)",
                     default_doc="printed only"))


def run_evaluate(v: dict) -> int:
    from ..data.io import atomic_write_json
    from ..eval import prediction_metrics
    from ..infer import read_predictions

    records = read_predictions(v["predictions"])
    result = {"fused": prediction_metrics(records),
              "top1_candidate": prediction_metrics(records, which="candidate", candidate=0)}
    if v["out"]:
        atomic_write_json(v["out"], result)
    print(json.dumps(result, indent=1))
    return 0


ANALYZE_OPTS = (
    Opt("system", list, None, "NAME=PREDICTIONS.jsonl, one per system (first: the split's reference, "
        "e.g. fine-tuned RAG after stage 1)", required=True),
    Opt("split_from", str, None, "the system whose candidates fix the inconsistent split",
        default_doc="the first --system"),
    Opt("out", str, None, "output directory for JSON, markdown and PNG", required=True),
)


def _systems(specs: list[str]) -> dict:
    from ..infer import read_predictions

    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--system: expected NAME=PATH, got {spec!r}")
        if not Path(path).is_file():
            raise ValueError(f"--system: {path} not found (for system {name!r})")
        out[name] = read_predictions(path)
    return out


def run_analyze(v: dict) -> int:
    from ..analysis import (
        PAPER_RERANKERS,
        oracle_accuracy,
        rerank_accuracy,
        split_consistency,
        write_analysis,
        write_consistency_tables,
    )

    systems = _systems(v["system"])
    ref = v["split_from"] or next(iter(systems))
    if ref not in systems:
        raise ValueError(f"--split-from: expected one of {sorted(systems)}, got {ref!r}")
    out = Path(v["out"])
    tables = write_consistency_tables(str(out), systems, split_consistency(systems[ref]), extra={"split_from": ref})
    for metric, m in tables.items():
        print(f"{metric} by split (inconsistent share {100 * m['share_inconsistent']:.1f}%, split from {ref}):")
        for name, row in m["systems"].items():
            print(f"  {name:<24}" + "  ".join(f"{k} {'-' if x is None else f'{100 * x:.1f}'}" for k, x in row.items()))
    table = {name: {**rerank_accuracy(recs, PAPER_RERANKERS), "oracle": oracle_accuracy(recs)}
             for name, recs in systems.items()}
    write_analysis(str(out), "rerank_oracle", table)
    print(f"reranking and oracle accuracy written to {out}")
    return 0


COMMANDS = (
    Command("predict", "retrieve, score, fuse and write predictions (JSONL)",
            "Inference: top-k per head, every candidate scored by the reader, fused; resumable.", PREDICT_OPTS,
            run_predict),
    Command("evaluate", "metrics of a predictions file", "Accuracy / macro-F1 (or the kind's metrics) of "
            "the fused predictions and of the top-1 candidate alone.", EVALUATE_OPTS, run_evaluate),
    Command("analyze", "the paper's analyses over several systems' predictions",
            "Inconsistent vs consistent split (Tables 5-6, accuracy and macro-F1), oracle (Table 1) and "
            "rerankers (Table 8); JSON, markdown and PNG per table.", ANALYZE_OPTS, run_analyze),
)
