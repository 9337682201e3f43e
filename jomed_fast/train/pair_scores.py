r"""Reader scores of (query, candidate) pairs through the score cache: each pair goes to the reader once.

``PairScores.rows(query_keys, ..., candidate_keys, candidates) -> [B, K, C]`` float32: for B queries
and their K candidates each, the reader's class log-probabilities
:math:`\log p_C(c \mid z_k, q_b)` (``CandidateScorer``) — read from the :class:`ScoreCache` where
stored, computed for the misses only:

1. look every (query key, candidate key) pair up;
2. group the queries by their number of misses ``m`` (``CandidateScorer.score`` takes the same K
   for every query of a call), one ``score`` call per group, queries in batch order — the grouping
   is a pure function of the cache state, so a resumed run scores exactly what an uninterrupted
   one would;
3. append all the new rows of the batch as **one** frame (a batch is cached entirely or not at all).

Keys are contents, never ids or paths (:func:`query_key`: the query image's bytes and question;
:func:`record_key`: the candidate record's image bytes and caption; the namespace adds the reader
fingerprint, task and layout), so a cache reused after a record, a query image or the reader
changed serves none of the old scores.

``gold_log_likelihoods(rows, labels) -> [B, K]``: :math:`r_{b,k} = \log p_C(a_b \mid z_k, q_b)` for a
single gold class per query (the sharp posterior's gold entry); in ``sequence`` class mode with
``normalize=False`` it is the restricted teacher-forced log-likelihood of the gold answer's tokens.

Multi-label tasks: a row is the reader's answer-set distribution, ``log p(S | z_k, q_b)`` for every
answer set of the scorer's ``head.sets`` (``score(..., label_sets=True)``, ``scoring.label_set_head``:
the restricted likelihood of the answer written as a set), and the gold entry is that of the
query's gold set, :math:`r_{b,k} = \log p(S_b \mid z_k, q_b)`
(``gold_log_likelihoods(rows, multi_hot, head)``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from ..identity import bytes_digest, file_digest, json_digest
from .score_cache import ScoreCache

__all__ = [
    "CandidateKeys",
    "PairScores",
    "gold_log_likelihoods",
    "query_key",
    "record_key",
    "image_key",
    "scoring_layout",
]


def image_key(item) -> str | None:
    """The content of the image the reader sees: the in-memory pixels when there are (dtype, shape,
    bytes), else the file's bytes."""
    if getattr(item, "image", None) is not None:
        a = np.ascontiguousarray(item.image)
        return bytes_digest(f"{a.dtype}{a.shape}".encode() + a.tobytes())
    if getattr(item, "image_path", None) is not None:
        return file_digest(item.image_path)
    return None


def query_key(sample) -> str:
    """A query's cache key: the digest of its image's content and its question."""
    return json_digest(["query", image_key(sample), getattr(sample, "question", None)])


def record_key(record) -> str:
    """A candidate's cache key: the digest of its index record's image content and caption."""
    return json_digest(["candidate", image_key(record), record.text])


class CandidateKeys:
    """``record_key`` of the index rows of a ``Retrieval`` (each row hashed once)."""

    def __init__(self, retrieval):
        self.records = retrieval.records
        self._keys: dict[int, str] = {}

    def __call__(self, rows: torch.Tensor) -> list[list[str]]:
        """``[B, K]`` index rows -> their keys."""
        out = []
        for row in rows.tolist():
            for r in row:
                if r not in self._keys:
                    self._keys[r] = record_key(self.records[r])
            out.append([self._keys[r] for r in row])
        return out


def scoring_layout(scorer) -> str:
    """The cache key's ``layout`` part: prompt layout, class mode and normalisation of ``scorer``
    (multi-label: the label-set head and the largest answer set it scores)."""
    key = f"{scorer.layout}|{scorer.head.mode}|{'norm' if scorer.head.normalize else 'raw'}"
    return key + f"|max_labels={scorer.head.max_labels}" if _label_sets(scorer) else key


def _label_sets(scorer) -> bool:
    """Whether ``scorer``'s rows are answer-set distributions (a multi-label task)."""
    task = getattr(scorer, "task", None)
    return bool(getattr(task, "is_multilabel", False))


def gold_log_likelihoods(rows: torch.Tensor, labels: torch.Tensor, head=None) -> torch.Tensor:
    """``rows [B, K, C]`` and gold class indices ``labels [B]`` -> ``[B, K]`` = rows[b, k, labels[b]].

    Multi-label: ``rows [B, K, |S|]`` (answer sets in ``head.sets`` order), ``labels [B, C]`` the
    gold sets' multi-hot rows and ``head`` the scorer's ``LabelSetHead``; entry ``[b, k]`` is the
    gold set's ``log p(S_b | z_k, q_b)``.
    """
    if rows.dim() != 3:
        raise ValueError(f"rows: expected [B, K, C], got shape {tuple(rows.shape)}")
    if torch.as_tensor(labels).dim() == 2:
        if head is None:
            raise ValueError("head: multi-hot gold labels need the scorer's label-set head to find their sets")
        sets = torch.as_tensor(labels, dtype=torch.bool)
        labels = torch.tensor([head.set_index(torch.nonzero(row).flatten().tolist()) for row in sets])
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.shape != rows.shape[:1]:
        raise ValueError(f"labels: expected shape [B] = [{rows.shape[0]}], got {tuple(labels.shape)}")
    C = rows.shape[2]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= C):
        raise ValueError(f"labels: expected class indices in [0, {C}), got {labels.tolist()}")
    return rows.gather(2, labels.view(-1, 1, 1).expand(-1, rows.shape[1], 1)).squeeze(2)


class PairScores:
    """Reader rows of (query, candidate) pairs, cached (see the module docstring).

    Args:
        scorer: a ``CandidateScorer`` (frozen reader; run under ``torch.no_grad``).
        cache: an open :class:`ScoreCache`.
        namespace: ``(reader fingerprint, task identity (``Task.identity``), layout)``.

    ``rows`` takes opaque string keys (:func:`query_key`, :func:`record_key` in training).
    """

    def __init__(self, scorer, cache: ScoreCache, namespace: tuple[str, str, str]):
        self.scorer = scorer
        self.cache = cache
        self.namespace = namespace
        self.reader_calls = 0

    def rows(
        self,
        query_ids: Sequence[str],
        query_images: Sequence,
        questions: Sequence | None,
        candidate_ids: Sequence[Sequence[str]],
        candidates: Sequence[Sequence],
    ) -> torch.Tensor:
        """float32 ``[B, K, C]`` for B queries x K candidates (their keys and ``Candidate`` objects);
        ``[B, K, |S|]`` answer-set log-probabilities for a multi-label task."""
        B = len(query_ids)
        if len(candidate_ids) != B or len(candidates) != B or len(query_images) != B:
            raise ValueError(
                f"candidate_ids, candidates, query_images: expected {B} entries (one per query), got "
                f"{len(candidate_ids)}, {len(candidates)}, {len(query_images)}"
            )
        K = len(candidate_ids[0]) if B else 0
        pairs = [(str(query_ids[b]), str(c)) for b in range(B) for c in candidate_ids[b]]
        if len(pairs) != B * K:
            raise ValueError(f"candidate_ids: expected K = {K} candidates for every query")
        found = self.cache.lookup(self.namespace, pairs)
        missing = [[k for k in range(K) if found[b * K + k] is None] for b in range(B)]
        new_pairs, new_rows, seconds = [], [], 0.0
        for m in sorted({len(ks) for ks in missing} - {0}):
            group = [b for b in range(B) if len(missing[b]) == m]
            t0 = time.perf_counter()
            with torch.no_grad():
                out = self.scorer.score(
                    [query_images[b] for b in group],
                    None if questions is None else [questions[b] for b in group],
                    [[candidates[b][k] for k in missing[b]] for b in group],
                    **({"label_sets": True} if _label_sets(self.scorer) else {}),
                )
            seconds += time.perf_counter() - t0
            self.reader_calls += 1
            out = out.detach().float().cpu().numpy()
            for g, b in enumerate(group):
                for j, k in enumerate(missing[b]):
                    found[b * K + k] = out[g, j]
                    new_pairs.append(pairs[b * K + k])
                    new_rows.append(out[g, j])
        if new_pairs:
            self.cache.append(self.namespace, new_pairs, np.stack(new_rows), seconds)
        if not B:
            return torch.zeros(0, 0, 0)
        return torch.from_numpy(np.stack([np.asarray(r, dtype=np.float32) for r in found])).view(B, K, -1)
