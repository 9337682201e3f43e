"""Option sets and loaders several subcommands share (reader, task, data, index + encoder)."""

from __future__ import annotations

from ..prompts import LAYOUTS
from ..scoring.label_set_head import DEFAULT_MAX_LABELS
from ..tasks import PROMPT_STYLES
from .options import Opt

READER_OPTS = (
    Opt("reader", str, None, "reader checkpoint directory (local only)", required=True),
    Opt("adapter", str, None, "LoRA adapter directory written by training"),
    Opt("quantization", str, "none", "reader weights", choices=("none", "nf4", "int8")),
    Opt("device", str, None, "cpu, cuda or cuda:N", default_doc="cuda when available, else cpu"),
    Opt("task", str, "synthetic", "task name (see jomed_fast.tasks)"),
    Opt(
        "prompts",
        str,
        "paper",
        "the built-in task's prompts: the paper's listings, or the authors' code's where they differ",
        choices=PROMPT_STYLES,
    ),
    Opt(
        "max_labels",
        int,
        None,
        "multi-label tasks: the largest answer set scored (the task's label count scores every set)",
        default_doc=str(DEFAULT_MAX_LABELS),
    ),
    Opt("layout", str, "paper", "prompt layout", choices=LAYOUTS),
)
DATA_OPTS = (
    Opt("samples", str, None, "samples JSONL ({id?, image_path, question?, answer})", required=True),
    Opt("skip_bad", bool, False, "skip and count bad records instead of stopping"),
)
INDEX_OPTS = (
    Opt("index", str, None, "index directory (jomed-fast build-index)"),
    Opt("index_records", str, None, "the index records JSONL in index order", default_doc="the index's own"),
    Opt("encoder", str, None, "retriever encoder directory (TinyCLIP, HF CLIP / SigLIP, open_clip, remote code)"),
    Opt("trust_remote_code", bool, False, "run the encoder directory's own model code (jina-clip-v1)"),
    Opt(
        "exclude_self",
        bool,
        True,
        "leave each query's own index records (same record id or image-file sha256) out of its retrieval",
    ),
    Opt(
        "near_duplicate",
        float,
        None,
        "also leave out index records whose image embedding has at least this cosine with the query's",
        default_doc="off",
    ),
)


def task_from(values: dict):
    """The task of ``--task`` in the ``--prompts`` variant."""
    from ..tasks import get_task

    return get_task(values["task"], values["prompts"])


def max_labels_from(values: dict, task) -> int:
    """``--max-labels`` for ``task``: the head's default unless given; given for a task that does
    not score answer sets, or below 1, it is an error."""
    m = values["max_labels"]
    if m is None:
        return DEFAULT_MAX_LABELS
    if not task.is_multilabel:
        raise ValueError(f"--max-labels: applies to multi-label tasks only; task {task.name!r} is {task.kind}")
    if m < 1:
        raise ValueError(f"--max-labels: expected a positive int, got {m}")
    return int(m)


def load_reader_from(values: dict):
    from ..readers import load_reader

    quant = None if values["quantization"] == "none" else values["quantization"]
    reader = load_reader(values["reader"], quantization=quant, lora=values.get("adapter"), device=values["device"])
    reader.model.requires_grad_(False)
    return reader.eval()


def load_samples_from(values: dict, task):
    from ..data import load_samples

    return load_samples(values["samples"], task, skip_bad=values["skip_bad"], verify_images="decode")


def load_retrieval_from(values: dict):
    """(Retrieval, encoder), or (None, None) when no index is given."""
    if values["index"] is None:
        return None, None
    from ..candidate_retrieval import Retrieval
    from ..data import load_index_records
    from ..index import Index
    from ..retriever import load_encoder

    if values["encoder"] is None:
        raise ValueError("--encoder: required with --index (the index's encoder embeds the queries)")
    near = values["near_duplicate"]
    if near is not None and not 0.0 < near <= 1.0:
        raise ValueError(f"--near-duplicate: expected a cosine in (0, 1], got {near!r}")
    encoder = load_encoder(values["encoder"], trust_remote_code=values["trust_remote_code"])
    index = Index.open(values["index"], encoder)
    records = load_index_records(values["index_records"]) if values["index_records"] else None
    return Retrieval(index, records, exclude_self=values["exclude_self"], near_duplicate=near), encoder
