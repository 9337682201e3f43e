"""Checking and normalising ``score``'s arguments (errors name the argument and the position)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from ..prompts import Candidate, as_candidate


def _as_list(value: Any, name: str, what: str) -> list:
    if isinstance(value, np.ndarray):
        if value.ndim < 1:
            raise TypeError(f"{name}: expected a sequence of {what}, got a 0-d array")
        return list(value)
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, Sequence):
        raise TypeError(f"{name}: expected a sequence (list) of {what}, got {type(value).__name__}")
    return list(value)


def normalize_inputs(task, query_images, questions, candidates):
    """``(query_images [B], questions [B], candidates [B][K], B, K)``.

    * ``query_images``: B images (PIL, arrays) or None (no query image) — a list, or an array
      ``[B, H, W(, 3)]``.
    * ``questions``: None (every query asks the task's fixed question) or B entries, each a str
      or None (the fixed question). A task without a fixed question (VQA) needs every one.
    * ``candidates``: B lists of K candidates each — ``Candidate``s, dicts / records with
      ``image`` and ``text``, ``(image, text)`` tuples, or None (the prompt without retrieval).
      K must be the same for every query (the scores are a dense ``[B, K, C]`` tensor; score
      queries with different K in separate calls); K = 0 is refused.
    """
    images = _as_list(query_images, "query_images", "B query images (or None)")
    B = len(images)
    if B == 0:
        raise ValueError("query_images: expected at least one query, got none")
    if questions is None:
        qs: list[Optional[str]] = [None] * B
    else:
        qs = _as_list(questions, "questions", "B questions (str or None)")
        if len(qs) != B:
            raise ValueError(f"questions: expected {B} questions (one per query image), got {len(qs)}")
    for b, q in enumerate(qs):
        if q is not None and not isinstance(q, str):
            raise TypeError(f"questions[{b}]: expected a str or None, got {type(q).__name__}")
        if q is None and task.question is None:
            raise ValueError(
                f"questions[{b}]: task {task.name!r} has no fixed question, so every query needs its own (got None)"
            )
    cands = _as_list(candidates, "candidates", "B lists of candidates")
    if len(cands) != B:
        raise ValueError(f"candidates: expected {B} candidate lists (one per query image), got {len(cands)}")
    out: list[list[Optional[Candidate]]] = []
    K = None
    for b, row in enumerate(cands):
        row = _as_list(row, f"candidates[{b}]", "candidates")
        if not row:
            raise ValueError(f"candidates[{b}]: expected at least one candidate, got an empty list")
        if K is None:
            K = len(row)
        elif len(row) != K:
            raise ValueError(
                f"candidates[{b}]: expected K = {K} candidates like candidates[0], got {len(row)} (the scores are "
                "a dense [B, K, C] tensor; score queries with different K in separate calls)"
            )
        out.append([None if c is None else as_candidate(c, f"candidates[{b}][{k}]") for k, c in enumerate(row)])
    return images, qs, out, B, K
