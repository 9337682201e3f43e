"""``train-reader`` (stage 1) and ``train-retriever`` (stage 2): thin wrappers over
``jomed_fast.train``; every field of the stage's config dataclass is an option, and rerunning the
same command in the same ``--run-dir`` resumes from its last checkpoint — only when every input
that decides the result is the same (reader and adapter, samples, index and encoder, task and the
options that change results; ``--progress``, the checkpoint and log cadence and ``--report-to``
may change): otherwise one line names what changed and the exit code is 2, as for a NaN loss.
Both write ``RUN_DIR/log.jsonl`` as they go (``--log-every``; ``--report-to tensorboard`` also
``RUN_DIR/tensorboard/``, checked installed before anything loads). SIGTERM ends a run after the
step under way with a checkpoint, one line and exit code 143."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from ..train.run_log import check_report_to
from .common import INDEX_OPTS, READER_OPTS, load_retrieval_from, max_labels_from, task_from
from .options import Command, Opt, config_from, config_options


def _samples(path: str, task, skip_bad: bool):
    from ..data import load_samples

    return load_samples(path, task, skip_bad=skip_bad, verify_images="decode")


SPLIT_OPTS = (
    Opt("train", str, None, "training samples JSONL", required=True),
    Opt("val", str, None, "validation samples JSONL"),
    Opt("skip_bad", bool, False, "skip and count bad records instead of stopping"),
    Opt("run_dir", str, None, "checkpoints, config and results (a rerun resumes)", required=True),
    Opt("resume", bool, True, "continue the run in --run-dir when it has a checkpoint"),
    Opt("progress", bool, True, "progress bar on stderr"),
)


def _reader_opts() -> tuple:
    from ..train import ReaderTrainConfig

    return (
        *READER_OPTS,
        *SPLIT_OPTS,
        *INDEX_OPTS,
        Opt("lora_r", int, 8, "LoRA rank (alpha = 2 r)"),
        Opt(
            "lora_vision",
            bool,
            False,
            "LoRA on the vision tower's blocks too (the authors' code trains the tower; the paper "
            "grid-searched freezing it); recorded in the adapter and the reader's fingerprint",
        ),
        Opt("seed_lora", int, 0, "seed of the fresh LoRA adapter's initialisation"),
        *config_options(ReaderTrainConfig, skip=("layout", "max_labels")),
    )


def run_train_reader(v: dict) -> int:
    import torch

    from ..readers import load_reader
    from ..train import ReaderTrainConfig, train_reader

    task = task_from(v)
    config = config_from(ReaderTrainConfig, v, layout=v["layout"], max_labels=max_labels_from(v, task))
    check_report_to(config.report_to)
    quant = None if v["quantization"] == "none" else v["quantization"]
    # the data and the index first: a bad file is reported before a reader of many GB loads
    train = _samples(v["train"], task, v["skip_bad"])
    val = _samples(v["val"], task, v["skip_bad"]) if v["val"] else []
    retrieval, encoder = load_retrieval_from(v)
    torch.manual_seed(v["seed_lora"])
    lora = v["adapter"] or {"r": v["lora_r"], "alpha": 2 * v["lora_r"], "vision": v["lora_vision"]}
    reader = load_reader(v["reader"], quantization=quant, lora=lora, device=v["device"], lora_trainable=True)
    result = train_reader(
        config,
        reader,
        task,
        train,
        val,
        v["run_dir"],
        retrieval=retrieval,
        retriever=encoder,
        resume=v["resume"],
        progress=v["progress"],
    )
    print(
        json.dumps(
            {
                "adapter": str(result.adapter_dir),
                "best_val_loss": result.best_val_loss,
                "best_step": result.best_step,
                "select_by": result.select_by,
                "best_value": result.best_value,
                "steps": result.steps,
                "excluded_self": result.excluded_self,
            }
        )
    )
    return 0


def _retriever_opts() -> tuple:
    from ..train import RetrieverTrainConfig

    return (
        *READER_OPTS,
        *SPLIT_OPTS,
        *INDEX_OPTS,
        Opt(
            "heads",
            str,
            "both",
            "train the text head, the image head, or both in sequence",
            choices=("both", "text", "image"),
        ),
        *config_options(RetrieverTrainConfig, skip=("head", "layout", "max_labels")),
    )


def run_train_retriever(v: dict) -> int:
    from ..readers import load_reader
    from ..retriever import HeadEncoders, QueryEncoder
    from ..train import RetrieverTrainConfig, train_retriever, train_retriever_heads

    if v["index"] is None:
        raise ValueError("--index: required (stage 2 trains the retriever against a fixed index)")
    task = task_from(v)
    config = config_from(RetrieverTrainConfig, v, layout=v["layout"], max_labels=max_labels_from(v, task))
    check_report_to(config.report_to)
    quant = None if v["quantization"] == "none" else v["quantization"]
    train = _samples(v["train"], task, v["skip_bad"])  # before the reader loads, as above
    val = _samples(v["val"], task, v["skip_bad"]) if v["val"] else None
    retrieval, encoder = load_retrieval_from(v)
    reader = load_reader(v["reader"], quantization=quant, lora=v["adapter"], device=v["device"])
    reader.model.requires_grad_(False)
    if retrieval is not None:
        retrieval.to(reader.device)  # stage 2 searches every batch: on the reader's device
    run = Path(v["run_dir"])
    if v["heads"] == "both":
        trained = train_retriever_heads(
            config, reader, task, encoder, retrieval, train, val, run, resume=v["resume"], progress=v["progress"]
        )
        results, encoders = trained.results(), trained.encoders
    else:  # one head trained; the other stays the base encoder
        encoders = HeadEncoders.untrained(encoder, config.alpha)
        query = QueryEncoder(copy.deepcopy(encoder), config.n_trainable, config.alpha)
        results = {
            v["heads"]: train_retriever(
                config.replace(head=v["heads"]),
                reader,
                task,
                query,
                retrieval,
                train,
                val,
                run / v["heads"],
                resume=v["resume"],
                progress=v["progress"],
            )
        }
        setattr(encoders, v["heads"], query.eval())
    encoders.save(run / "query_encoder")
    print(
        json.dumps(
            {
                "query_encoder": str(run / "query_encoder"),
                **{
                    h: {
                        "final_eval": r.final_eval,
                        "selected": r.selected,
                        "cache": r.cache,
                        "warnings": r.warnings,
                        "dedup": r.dedup,
                        "excluded_self": r.excluded_self,
                    }
                    for h, r in results.items()
                },
                "excluded_self": retrieval.excluded.to_dict(),
            }
        )
    )
    return 0


COMMANDS = (
    Command(
        "train-reader",
        "stage 1: LoRA fine-tuning of the reader with retrieval in context",
        "Each (sample, retrieved candidate) is one example; without --index the reader-only baseline. "
        "Writes RUN_DIR/adapter (load it with --adapter).",
        _reader_opts(),
        run_train_reader,
    ),
    Command(
        "train-retriever",
        "stage 2: the retriever distilled from the frozen reader",
        "Text head, then image head (--heads both), each its own query encoder, with the exact "
        "reader-score cache in RUN_DIR; writes RUN_DIR/query_encoder (predict --query-encoder).",
        _retriever_opts(),
        run_train_retriever,
    ),
)
