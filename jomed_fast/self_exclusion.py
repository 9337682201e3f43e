r"""Leave-self-out retrieval: which index records are the query itself, and the top-k without them.

When the index holds the query's own record (an index built from the training split, a test image
that is also in the literature set), similarity search returns it first and the reader is shown
its own answer. For a query :math:`q` with id :math:`u_q`, image digests :math:`H_q` and the
embedding :math:`e_q` the image head searches with, and index rows :math:`n` with id :math:`u_n`,
image digest :math:`h_n` and image embedding :math:`i_n`, the excluded set is

.. math::
    E_q = \{n : u_n = u_q\} \;\cup\; \{n : h_n \in H_q\}
          \;\cup\; \{n : \cos(e_q, i_n) \ge \theta\}

(the last only with ``near_duplicate = θ``), and each head returns the top-k of the rows left:

.. math:: \operatorname{top-}k_{\,n \notin E_q}\; q \cdot x_n .

Image digests are sha256s, never decoded-pixel similarity: an index row carries either
``image_sha256`` (the sha256 of its image file's **bytes**) or ``pixels_sha256`` (the sha256 of
its in-memory **decoded pixels**, dtype and shape included), as the index build wrote them
(:func:`jomed_fast.data.records.image_identity`). A query is matched on both: the bytes of its
image file against rows with a file digest, and its decoded pixels against rows with a pixel
digest. The same picture stored as two different files (re-encoded, another format) has other
bytes; that case is what ``near_duplicate`` is for.

Each head searches ``k + |E_q|`` rows (the most its excluded rows can take from the top) and keeps
the first ``k`` not in :math:`E_q`, so K stays K. The ids and digests of the N index rows are kept
as sorted fixed-width byte arrays (16 bytes of sha256 per id, 32 per digest: 100 MB for the paper's
2.1M rows, against about 1 GB as Python dicts of strings) and looked up with ``searchsorted``; an
id match is confirmed on the full id string, so a truncated-hash collision never excludes a row.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ._checks import is_number

__all__ = ["ExclusionCount", "RowKeys", "SelfExclusion", "keep_first_allowed"]

_ID_BYTES = 16
_DIGEST_KEYS = ("image_sha256", "pixels_sha256")


@dataclass(frozen=True)
class SelfExclusion:
    """What counts as the query itself.

    Attributes:
        exclude_self: leave out index rows with the query's record id or image digest.
        near_duplicate: also leave out rows whose image embedding has cosine >= this with the query
            embedding of the image head (``None``: off). Works with ``exclude_self`` off too.
    """

    exclude_self: bool = True
    near_duplicate: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.exclude_self, bool):
            raise ValueError(f"exclude_self: expected a bool, got {self.exclude_self!r}")
        t = self.near_duplicate
        if t is not None and not (is_number(t) and math.isfinite(t) and 0.0 < t <= 1.0):
            raise ValueError(f"near_duplicate: expected a cosine in (0, 1] or None, got {t!r}")
        if t is not None:
            object.__setattr__(self, "near_duplicate", float(t))

    @property
    def active(self) -> bool:
        return self.exclude_self or self.near_duplicate is not None

    def identity(self) -> dict:
        """The options as a run's identity records them (a resume with others is refused)."""
        return {"exclude_self": self.exclude_self, "near_duplicate": self.near_duplicate}


@dataclass
class ExclusionCount:
    """Index rows left out, summed over searches: per reason (a row matched by several counts once,
    under the first of id, image digest, near duplicate) and the queries that lost any."""

    queries: int = 0
    queries_with_exclusions: int = 0
    by_id: int = 0
    by_image: int = 0
    near_duplicate: int = 0

    @property
    def records(self) -> int:
        return self.by_id + self.by_image + self.near_duplicate

    def to_dict(self) -> dict:
        return {
            "records": self.records,
            "by_id": self.by_id,
            "by_image": self.by_image,
            "near_duplicate": self.near_duplicate,
            "queries": self.queries,
            "queries_with_exclusions": self.queries_with_exclusions,
        }


class _SortedKeys:
    """Fixed-width byte keys of rows, sorted once: ``rows(key)`` is every row holding ``key``."""

    def __init__(self, keys: list[bytes], rows: list[int], width: int):
        arr = np.array(keys, dtype=f"S{width}")
        order = np.argsort(arr, kind="stable")
        self.keys = arr[order]
        self.rows = np.asarray(rows, dtype=np.int64)[order]

    def rows_of(self, key: bytes) -> list[int]:
        lo = int(np.searchsorted(self.keys, key, side="left"))
        hi = int(np.searchsorted(self.keys, key, side="right"))
        return self.rows[lo:hi].tolist()


def _id_key(record_id: str) -> bytes:
    return hashlib.sha256(str(record_id).encode()).digest()[:_ID_BYTES]


class RowKeys:
    """The ids and image digests of an index's rows (``Index.records()``), for :meth:`own_rows`."""

    def __init__(self, rows: Sequence[dict]):
        self.ids = [str(r["id"]) for r in rows]
        self._by_id = _SortedKeys([_id_key(i) for i in self.ids], list(range(len(rows))), _ID_BYTES)
        self._by_digest = {}
        for key in _DIGEST_KEYS:
            held = [(bytes.fromhex(r[key]), n) for n, r in enumerate(rows) if key in r]
            if held:
                self._by_digest[key] = _SortedKeys([d for d, _ in held], [n for _, n in held], 32)

    def own_rows(self, query) -> tuple[list[int], list[int]]:
        """``(rows with the query's id, further rows with its image digest)`` for a record or sample
        (``id``, ``image_path``, ``image``, ``load_image()``)."""
        from .data.records import pixels_digest
        from .identity import file_digest

        qid = str(query.id)
        by_id = [n for n in self._by_id.rows_of(_id_key(qid)) if self.ids[n] == qid]
        digests = []
        if "image_sha256" in self._by_digest and getattr(query, "image_path", None) is not None:
            try:
                digests.append(("image_sha256", file_digest(query.image_path)))
            except FileNotFoundError:
                pass  # an in-memory query whose path is gone: its pixels still count
        if "pixels_sha256" in self._by_digest:
            image = query.image if getattr(query, "image", None) is not None else query.load_image()
            digests.append(("pixels_sha256", pixels_digest(np.asarray(image))))
        seen = set(by_id)
        by_image = []
        for key, hexdigest in digests:
            for n in self._by_digest[key].rows_of(bytes.fromhex(hexdigest)):
                if n not in seen:
                    seen.add(n)
                    by_image.append(n)
        return by_id, by_image


def keep_first_allowed(scores: torch.Tensor, ids: torch.Tensor, excluded: torch.Tensor, k: int):
    """From a head's ranked ``(scores [Q, k'], ids [Q, k'])`` keep, per query, the first ``k`` ids
    not in its row of ``excluded`` ``[Q, M]`` (padded with -1), in rank order: ``([Q, k], [Q, k])``."""
    if excluded.shape[1] == 0:
        return scores[:, :k], ids[:, :k]
    hit = (ids.unsqueeze(-1) == excluded.to(ids.device).unsqueeze(1)).any(-1)  # [Q, k']
    # a stable sort on the flag moves the excluded rows behind the others, rank order kept
    order = torch.sort(hit.to(torch.int8), dim=1, stable=True).indices[:, :k]
    return scores.gather(1, order), ids.gather(1, order)
