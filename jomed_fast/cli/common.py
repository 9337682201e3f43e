"""Option sets and loaders several subcommands share (reader, task, data, index + encoder)."""

from __future__ import annotations

from ..prompts import LAYOUTS
from ..scoring.label_set_head import DEFAULT_MAX_LABELS
from ..tasks import PROMPT_STYLES
from .options import Opt

DEFAULT_TASK = "synthetic"
TASK_OPTS = (
    Opt("task", str, None, "a built-in task's name (see jomed_fast.tasks)", default_doc=DEFAULT_TASK),
    Opt(
        "task_file",
        str,
        None,
        "a task of your own: a YAML file of jomed_fast.tasks.Task fields (jomed_fast.tasks.task_file)",
    ),
)
READER_OPTS = (
    Opt("reader", str, None, "reader checkpoint directory (local only)", required=True),
    Opt("adapter", str, None, "LoRA adapter directory written by training"),
    Opt("quantization", str, "none", "reader weights", choices=("none", "nf4", "int8")),
    Opt("device", str, None, "cpu, cuda or cuda:N", default_doc="cuda when available, else cpu"),
    *TASK_OPTS,
    Opt(
        "prompts",
        str,
        None,
        "the built-in task's prompts: the paper's listings, or the authors' code's where they differ",
        choices=PROMPT_STYLES,
        default_doc="paper",
    ),
    Opt(
        "max_labels",
        int,
        DEFAULT_MAX_LABELS,
        "multi-label tasks: the largest answer set scored (the task's label count scores every set)",
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


def task_from(values: dict, default: str | None = DEFAULT_TASK):
    """The task of ``--task`` (in the ``--prompts`` variant) or of ``--task-file``; ``default``
    when neither is given (None: no task)."""
    from ..tasks import get_task, load_task_file

    name, file, prompts = values.get("task"), values.get("task_file"), values.get("prompts")
    if file is not None:
        if name is not None:
            raise ValueError(f"--task-file: give --task or --task-file, not both (got --task {name})")
        if prompts is not None:
            raise ValueError("--prompts: chooses a built-in task's prompts; a --task-file task brings its own")
        return load_task_file(file)
    if name is None and default is None:
        return None
    return get_task(str(name if name is not None else default), prompts or "paper")


def max_labels_from(values: dict, task) -> int:
    """``--max-labels`` for ``task``; another value than the default for a task that does not
    score answer sets, or one below 1, is an error."""
    m = values["max_labels"]
    if m != DEFAULT_MAX_LABELS and not task.is_multilabel:
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
