r"""Table 8: answering with one of a query's K candidates (reranking) against fusion, per split.

A *reranker* maps a prediction record to the index of one of its candidates, or to ``None`` when
it names none (an LVLM reply that names no valid candidate). Its answer is that candidate's own
prediction; ``None`` is counted (``no_choice``) and scored as wrong, never mapped to a candidate.

The rerankers of the paper's Table 8, for candidates with retrieval scores :math:`s_k`, heads
:math:`h(k)` and the reader's class posteriors :math:`p(c \mid z_k \circ q)`:

* ``top1_retrieval_text`` / ``top1_retrieval_image``: :math:`\arg\max_{k:\, h(k) = h} s_k`, the
  best candidate of one head (a head's scores compare within that head only: the text head scores
  image-caption pairs, the image head image-image pairs, on other scales);
* ``top1_retrieval``: across heads, the candidate its own head ranks most probable,
  :math:`\arg\max_k \pi_k` with :math:`\pi_k = \operatorname{softmax}_{j:\, h(j) = h(k)}(s_j/\tau)_k`,
  each head's retrieval distribution over its own candidates (the quantity stage 2 trains), which
  is a probability in every head and so compares across them. A head that brought one candidate
  gives it :math:`\pi = 1`;
* ``top1_confidence``: :math:`\arg\max_k \max_c p(c \mid z_k \circ q)`, the reader's most
  confident candidate (multi-label: its largest label probability);
* ``fusion``: not a pick, the record's fused answer (the system itself);
* ``oracle``: some candidate right, the ceiling of any pick.

Ties go to the first candidate (``numpy.argmax``).

Splits: ``inconsistent`` (the candidates' predictions disagree: :func:`.consistency.is_inconsistent`),
``consistent`` and ``all``. The paper reports the inconsistent part: on a consistent query every
pick gives the same answer, so there the rows differ only by fusion and by picks that name none.

Every cell holds the accuracy, its ``n``, the 95% Wilson score interval

.. math:: \frac{\hat p + \frac{z^2}{2n} \pm z \sqrt{\frac{\hat p (1 - \hat p)}{n} + \frac{z^2}{4 n^2}}}
          {1 + \frac{z^2}{n}}, \qquad z = \Phi^{-1}(0.975),

and, for a pick, the exact McNemar test against fusion on the same queries (two-sided binomial
test on the queries where exactly one of the two is right):
:math:`p = \min\big(1,\ 2 \sum_{i \le \min(b, c)} \binom{b + c}{i} 2^{-(b + c)}\big)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from statistics import NormalDist

import numpy as np

from .._checks import is_int
from .consistency import _correct, is_inconsistent, oracle_correct
from .head_top1 import head_top1
from .prediction_records import PredictionRecord

__all__ = [
    "FUSION",
    "ORACLE",
    "PAPER_RERANKERS",
    "SPLITS",
    "Pick",
    "Reranker",
    "accuracies",
    "mcnemar_exact",
    "pick_correct",
    "rerank_table",
    "rerank_top_confidence",
    "rerank_top_retrieval",
    "rerank_top_retrieval_in_head",
    "rerankers_for",
    "within_head_probabilities",
    "wilson_interval",
]

Pick = int | None
Reranker = Callable[[PredictionRecord], Pick]
SPLITS = ("inconsistent", "consistent", "all")
FUSION, ORACLE = "fusion", "oracle"


def rerank_top_retrieval_in_head(head: str) -> Reranker:
    """The reranker that picks ``head``'s highest-scoring candidate (``None`` where it brought none)."""

    def pick(rec: PredictionRecord) -> Pick:
        return head_top1(rec, head)  # the definition evaluate reports as top1_<head>

    pick.__name__ = f"rerank_top_retrieval_{head}"
    return pick


def within_head_probabilities(rec: PredictionRecord, tau: float = 1.0) -> np.ndarray:
    """``[K]`` float64: each candidate's retrieval probability among its own head's candidates."""
    if not tau > 0:
        raise ValueError(f"tau: expected a positive temperature, got {tau!r}")
    s = np.array([c.score for c in rec.candidates], dtype=np.float64) / tau
    heads = np.array([c.head for c in rec.candidates])
    out = np.empty_like(s)
    for h in set(heads.tolist()):
        m = heads == h
        e = np.exp(s[m] - s[m].max())
        out[m] = e / e.sum()
    return out


def rerank_top_retrieval(rec: PredictionRecord, tau: float = 1.0) -> int:
    """The candidate its own head gives the largest retrieval probability (see the module docstring)."""
    return int(np.argmax(within_head_probabilities(rec, tau)))


def rerank_top_confidence(rec: PredictionRecord) -> int:
    """The candidate whose reader posterior has the largest class probability."""
    return int(np.argmax([max(c.probs) if c.probs else -np.inf for c in rec.candidates]))


PAPER_RERANKERS: dict[str, Reranker] = {
    "top1_retrieval": rerank_top_retrieval,
    "top1_retrieval_text": rerank_top_retrieval_in_head("text"),
    "top1_retrieval_image": rerank_top_retrieval_in_head("image"),
    "top1_confidence": rerank_top_confidence,
}


def rerankers_for(records: Sequence[PredictionRecord]) -> dict[str, Reranker]:
    """:data:`PAPER_RERANKERS` less the per-head rows of a head none of ``records``' candidates
    came from (a text-only run has no image row)."""
    heads = {c.head for r in records for c in r.candidates}
    return {
        name: fn
        for name, fn in PAPER_RERANKERS.items()
        if not name.startswith("top1_retrieval_") or name.removeprefix("top1_retrieval_") in heads
    }


def pick_correct(rec: PredictionRecord, pick: Pick, name: str = "pick") -> bool:
    """Whether candidate ``pick``'s prediction is right (``None``: no candidate named, wrong)."""
    if pick is None:
        return False
    if not (is_int(pick) or isinstance(pick, np.integer)) or not 0 <= pick < len(rec.candidates):
        raise ValueError(
            f"{name}: expected a candidate index in 0..{len(rec.candidates) - 1} or None for query "
            f"{rec.query_id!r}, got {pick!r}"
        )
    return _correct(rec.candidates[int(pick)].prediction, rec)


def wilson_interval(hits: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``hits / n`` (see the module docstring)."""
    if n < 1 or not 0 <= hits <= n:
        raise ValueError(f"hits, n: expected 0 <= hits <= n and n >= 1, got hits={hits}, n={n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: expected a level in (0, 1), got {confidence!r}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Two-sided exact McNemar p-value of paired outcomes ``a`` and ``b`` (see the module docstring)."""
    if len(a) != len(b):
        raise ValueError(f"a, b: expected paired outcomes of one length, got {len(a)} and {len(b)}")
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    m = only_a + only_b
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(only_a, only_b) + 1)) / 2**m
    return min(1.0, 2 * tail)


def _cell(hits: Sequence[bool], fused: Sequence[bool] | None, no_choice: int | None) -> dict | None:
    n = len(hits)
    if n == 0:
        return None
    lo, hi = wilson_interval(sum(hits), n)
    cell: dict = {"accuracy": sum(hits) / n, "n": n, "hits": int(sum(hits)), "ci95": [lo, hi]}
    if no_choice is not None:
        cell["no_choice"] = no_choice
    if fused is not None:
        cell["p_vs_fusion"] = mcnemar_exact(hits, fused)
    return cell


def rerank_table(
    records: Sequence[PredictionRecord],
    rerankers: Mapping[str, Reranker] | None = None,
    picks: Mapping[str, Mapping[str, Pick]] | None = None,
    split: Mapping[str, set] | None = None,
) -> dict:
    """Table 8 of one system: ``{row: {split: cell | None}}`` (see the module docstring).

    Rows: each of ``rerankers`` (default :func:`rerankers_for` the records), then each of ``picks``
    (``{row: {query_id: pick}}``, picks made elsewhere, e.g. by an LVLM, over some of the queries),
    then ``fusion`` and ``oracle``. ``split``: ``{"inconsistent", "consistent"}`` query ids, default
    the records' own candidates (:func:`.consistency.is_inconsistent`). A cell is ``None`` where
    the split holds no query, or where a row of ``picks`` lacks one of the split's queries.
    """
    if split is None:
        inconsistent = {r.query_id for r in records if is_inconsistent(r)}
    else:
        inconsistent = set(split["inconsistent"])
    part = {
        "inconsistent": [r for r in records if r.query_id in inconsistent],
        "consistent": [r for r in records if r.query_id not in inconsistent],
        "all": list(records),
    }
    rerankers = rerankers_for(records) if rerankers is None else rerankers
    picks = picks or {}
    clash = sorted(set(rerankers) & set(picks) | ({FUSION, ORACLE} & (set(rerankers) | set(picks))))
    if clash:
        raise ValueError(f"rerankers, picks: each row name once, and not 'fusion' or 'oracle'; got {clash} twice")
    chosen: dict[str, dict[str, Pick]] = {name: {r.query_id: fn(r) for r in records} for name, fn in rerankers.items()}
    chosen.update({name: dict(p) for name, p in picks.items()})
    fused = {r.query_id: _correct(r.fused, r) for r in records}
    table: dict[str, dict[str, dict | None]] = {}
    for name, by_query in chosen.items():
        row: dict[str, dict | None] = {}
        for s, rs in part.items():
            if any(r.query_id not in by_query for r in rs):
                row[s] = None
                continue
            hits = [pick_correct(r, by_query[r.query_id], f"{name} pick") for r in rs]
            row[s] = _cell(hits, [fused[r.query_id] for r in rs], sum(1 for r in rs if by_query[r.query_id] is None))
        table[name] = row
    table[FUSION] = {s: _cell([fused[r.query_id] for r in rs], None, None) for s, rs in part.items()}
    table[ORACLE] = {s: _cell([oracle_correct(r) for r in rs], None, None) for s, rs in part.items()}
    return table


def accuracies(table: Mapping[str, Mapping[str, dict | None]]) -> dict[str, dict[str, float | None]]:
    """``{row: {split: accuracy | None}}`` of a :func:`rerank_table`."""
    return {row: {s: None if c is None else c["accuracy"] for s, c in cells.items()} for row, cells in table.items()}
