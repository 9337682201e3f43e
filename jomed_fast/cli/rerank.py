"""``analyze``'s Table 8: the rerankers of every system, and the LVLM reranker on request.

With ``--lvlm-rerank local`` (the ``--reader`` checkpoint, e.g. the system's own reader, or any
VLM ``load_reader`` opens) or ``--lvlm-rerank URL`` (an OpenAI-compatible chat-completions
endpoint), the LVLM picks one of ``--lvlm-system``'s candidates on each of its inconsistent
queries (the query images from ``--samples``, the candidates' images and captions from
``--index-records``); its rows join that system's Table 8 and every reply is written to
``lvlm_rerank.jsonl`` beside it.
"""

from __future__ import annotations

from pathlib import Path

from .options import Opt

__all__ = ["LVLM_OPTS", "LVLM_REPLIES", "lvlm_backend", "lvlm_inputs", "write_rerank_table"]

LVLM_REPLIES = "lvlm_rerank.jsonl"

LVLM_OPTS = (
    Opt(
        "lvlm_rerank",
        str,
        None,
        "an LVLM picks the candidate on the inconsistent queries (the paper's o3 study): 'local' "
        "(the --reader checkpoint) or the URL of an OpenAI-compatible chat-completions endpoint",
        default_doc="off",
    ),
    Opt("lvlm_system", str, None, "the system whose candidates the LVLM picks from", default_doc="the last --system"),
    Opt("lvlm_variant", str, "images", "what the LVLM sees of a candidate", choices=("images", "captions", "both")),
    Opt("lvlm_model", str, None, "the model name sent to the --lvlm-rerank URL"),
    Opt(
        "lvlm_api_key_env",
        str,
        None,
        "the environment variable holding the endpoint's API key (sent as a Bearer token)",
        default_doc="no key sent",
    ),
    Opt("lvlm_timeout", float, 60.0, "seconds per request to the endpoint"),
    Opt("lvlm_retries", int, 2, "further attempts after a timeout, a connection failure or HTTP 408/429/5xx"),
    Opt("lvlm_max_new_tokens", int, 32, "reply length limit of the local LVLM"),
    Opt("samples", str, None, "the samples JSONL the systems predicted (query images, for --lvlm-rerank)"),
    Opt(
        "index_records",
        str,
        None,
        "the index records JSONL the candidates came from (for --lvlm-rerank; their labels for the baselines)",
    ),
    Opt("reader", str, None, "the local LVLM's checkpoint directory (--lvlm-rerank local)"),
    Opt("adapter", str, None, "a LoRA adapter for the local LVLM"),
    Opt("device", str, None, "cpu, cuda or cuda:N for the local LVLM", default_doc="cuda when available, else cpu"),
)


def lvlm_inputs(v: dict) -> dict:
    """The files the LVLM reranker reads, by flag (an output must never be one of them)."""
    return {f"--{k.replace('_', '-')}": v[k] for k in ("samples", "index_records") if v.get(k)}


class _LocalChat:
    """The local LVLM, loaded on its first prompt: every input is checked before the slow load."""

    def __init__(self, v: dict):
        if v["reader"] is None:
            raise ValueError("--reader: required with --lvlm-rerank local (the local LVLM's checkpoint)")
        self.v, self.chat = v, None

    def __call__(self, parts):
        if self.chat is None:
            from ..analysis.lvlm_chat import ReaderChat
            from ..readers import load_reader

            reader = load_reader(self.v["reader"], lora=self.v["adapter"], device=self.v["device"])
            reader.model.requires_grad_(False)
            self.chat = ReaderChat(reader.eval(), max_new_tokens=self.v["lvlm_max_new_tokens"])
        return self.chat(parts)


def lvlm_backend(v: dict):
    """The chat backend ``--lvlm-rerank`` names, every argument it needs checked (None when off);
    called before anything is written."""
    from ..analysis.lvlm_chat import ChatCompletions

    if v["lvlm_rerank"] is None:
        return None
    if v["task"] is None and v.get("task_file") is None:
        raise ValueError("--task: required with --lvlm-rerank (or --task-file)")
    for flag in ("samples", "index_records"):
        if v[flag] is None:
            raise ValueError(f"--{flag.replace('_', '-')}: required with --lvlm-rerank")
    if v["lvlm_rerank"] == "local":
        return _LocalChat(v)
    if v["lvlm_model"] is None:
        raise ValueError("--lvlm-model: required with --lvlm-rerank URL (the endpoint's model name)")
    try:
        return ChatCompletions(
            v["lvlm_rerank"],
            v["lvlm_model"],
            v["lvlm_api_key_env"],
            timeout=v["lvlm_timeout"],
            retries=v["lvlm_retries"],
        )
    except ValueError as exc:
        raise ValueError(f"--lvlm-rerank: {exc}") from None


def _lvlm_rows(v: dict, chat, records: list) -> tuple[dict, list]:
    """``({row: picks}, replies)`` of the LVLM over ``records``' inconsistent queries."""
    from ..analysis import is_inconsistent
    from ..analysis.lvlm_rerank import lvlm_picks, row_name
    from ..data import load_index_records, load_samples
    from .common import task_from

    task = task_from(v, default=None)
    chosen = [r for r in records if is_inconsistent(r)]
    wanted = {c.id for r in chosen for c in r.candidates}
    samples = {str(s.id): s for s in load_samples(v["samples"], task)}
    index = {r.id: r for r in load_index_records(v["index_records"])}
    # only the images the prompts show are decoded; a missing id is named by lvlm_picks
    query_images = {r.query_id: samples[r.query_id].load_image() for r in chosen if r.query_id in samples}
    candidates = {i: (index[i].load_image(), index[i].text) for i in wanted if i in index}
    variants = ("images", "captions") if v["lvlm_variant"] == "both" else (v["lvlm_variant"],)
    rows, replies = {}, []
    for variant in variants:
        picks, said = lvlm_picks(chosen, chat, task, query_images, candidates, variant, progress=True)
        rows[row_name(variant)] = picks
        replies += said
    return rows, replies


def write_rerank_table(out: Path, systems: dict, v: dict, chat=None) -> None:
    """Table 8 of every system with candidates to pick from, each on its own inconsistent queries
    (plus the rows of the LVLM ``chat``, from :func:`lvlm_backend`), written as ``rerank.{json,md,png}``."""
    from ..analysis import rerank_table, write_rerank_tables
    from ..analysis.lvlm_rerank import write_replies

    with_candidates = [name for name, recs in systems.items() if any(len(r.candidates) > 1 for r in recs)]
    lvlm_system = v.get("lvlm_system") or next(reversed(list(systems)))
    if chat is not None and lvlm_system not in with_candidates:
        raise ValueError(
            f"--lvlm-system: expected a system with candidates to pick from ({sorted(with_candidates)}), "
            f"got {lvlm_system!r}"
        )
    extra: dict = {}
    notes = {}
    if chat is not None:
        extra, replies = _lvlm_rows(v, chat, systems[lvlm_system])
        write_replies(str(out / LVLM_REPLIES), replies)
        where = "local" if v["lvlm_rerank"] == "local" else f"{v['lvlm_model']} at {v['lvlm_rerank']}"
        notes["lvlm_images, lvlm_captions"] = (
            f"an LVLM ({where}) picks {lvlm_system}'s candidate on its inconsistent queries only; "
            f"replies in {LVLM_REPLIES}"
        )
    tables = {
        name: rerank_table(systems[name], picks=extra if name == lvlm_system else None) for name in with_candidates
    }
    write_rerank_tables(str(out), tables, notes=notes)
    print("Table 8, accuracy on each system's inconsistent queries [95% Wilson interval]:")
    for name, table in tables.items():
        shown = [
            f"{row} {100 * c['accuracy']:.1f} [{100 * c['ci95'][0]:.1f}, {100 * c['ci95'][1]:.1f}]"
            for row, cells in table.items()
            for c in [cells["inconsistent"]]
            if c
        ]
        every = table["oracle"]["inconsistent"]
        print(f"  {name:<24}n={every['n'] if every else 0}  " + ("  ".join(shown) or "no inconsistent query"))
