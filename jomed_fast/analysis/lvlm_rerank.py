"""The LVLM reranker (the paper's o3 study): an LVLM picks one of a query's candidates, and the
picked candidate's own prediction is the answer.

For each record (default: the inconsistent ones only, the part Table 8 reports; on a consistent
query every valid pick gives the same answer) the prompt of :func:`.lvlm_prompt.rerank_prompt` is
built from the query image, the task's labels and the record's candidates in their stored order
(their images and captions looked up by id), sent to a chat backend (:mod:`.lvlm_chat`), and its
reply parsed (:func:`.lvlm_prompt.parse_choice`). A reply that names no valid candidate is a pick
of ``None``: :func:`.rerankers.rerank_table` counts it (``no_choice``) and scores it as wrong.

The picks go into :func:`.rerankers.rerank_table` as ``picks={"lvlm_images": ...}`` (or
``lvlm_captions`` for the captions-only variant); every reply is kept for audit
(:func:`write_replies`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from jomed_fast.data.io import atomic_write_text

from .consistency import is_inconsistent
from .lvlm_prompt import Part, parse_choice, rerank_prompt
from .prediction_records import PredictionRecord
from .rerankers import Pick

__all__ = ["VARIANTS", "lvlm_picks", "row_name", "write_replies"]

VARIANTS = ("images", "captions")
Chat = Callable[[Sequence[Part]], str]


def row_name(variant: str) -> str:
    """The Table 8 row of a variant: ``lvlm_images`` / ``lvlm_captions``."""
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    return f"lvlm_{variant}"


def lvlm_picks(
    records: Sequence[PredictionRecord],
    chat: Chat,
    task,
    query_images: Mapping[str, Any],
    candidates: Mapping[str, tuple[Any, str]],
    variant: str = "images",
    *,
    only_inconsistent: bool = True,
    progress: bool = False,
) -> tuple[dict[str, Pick], list[dict]]:
    """``({query_id: pick}, replies)`` of the LVLM over ``records``.

    ``query_images``: ``{query_id: image}``; ``candidates``: ``{candidate id: (image, caption)}``
    (index records by id). ``replies``: one ``{query_id, variant, reply, pick, reason}`` per call.
    """
    row_name(variant)  # checks the variant
    with_images = variant == "images"
    chosen = [r for r in records if is_inconsistent(r)] if only_inconsistent else list(records)
    for rec in chosen:  # everything looked up before the first (slow, maybe paid) call
        if rec.query_id not in query_images:
            raise ValueError(f"query_images: no image for query {rec.query_id!r} (give the samples predicted)")
        missing = [c.id for c in rec.candidates if c.id not in candidates]
        if missing:
            raise ValueError(
                f"candidates: no index record for ids {missing[:3]} of query {rec.query_id!r} "
                "(give the index records the predictions retrieved from)"
            )
    picks: dict[str, Pick] = {}
    replies: list[dict] = []
    for rec in _progress(chosen, progress, f"LVLM reranker ({variant})"):
        pairs = [candidates[c.id] for c in rec.candidates]
        reply = chat(rerank_prompt(task, query_images[rec.query_id], pairs, with_images))
        choice = parse_choice(reply, len(pairs))
        picks[rec.query_id] = choice.index
        replies.append(
            {
                "query_id": rec.query_id,
                "variant": variant,
                "reply": reply,
                "pick": choice.index,
                "reason": choice.reason,
            }
        )
    return picks, replies


def _progress(items: list, show: bool, desc: str) -> Iterable:
    if not show:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="query")


def write_replies(path: str, replies: Iterable[dict]) -> None:
    """Every reply as JSONL (atomic): what the model said and how it was read."""
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in replies))
