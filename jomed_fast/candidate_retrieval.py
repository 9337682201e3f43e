r"""Retrieval for the pipeline: query images -> top-k of each head -> the reader's ``Candidate`` lists.

For Q query images with embeddings :math:`q \in \mathbb{R}^{Q \times D}` (the retriever's image
tower), each head searches its fixed index embeddings ``[N, D]``:

* text head  :math:`\operatorname{top-}k_T\; q \cdot t_n` (index captions),
* image head :math:`\operatorname{top-}k_I\; q \cdot i_n` (index images),

and the two lists are concatenated per query (``retriever.dual.merge_heads``: text first, then
image, ``K = k_T + k_I``; a record found by both heads appears twice). The reference retrieves
``k_T = k_I = 2`` at inference and in stage 1; stage 2 trains one head at a time with ``K = 50``
from that head alone (``k`` of the other head 0).

``Retrieval`` ties an opened :class:`~jomed_fast.index.Index` to the index records it was built
from (row ``n`` of the embeddings is record ``n``), so search results become
:class:`~jomed_fast.prompts.Candidate` objects (image, caption, id) the scorer takes. Records given
by the caller are checked against every row the index stored at build time (id, caption and image
digest: each image file's bytes are hashed once per process, not decoded; an index built from
in-memory pixels is compared with the decoded pixels), so records in another order, edited, or
with other images are refused before any search. Record images are decoded on first use
and kept (the same index rows come back across queries and epochs); with the index's own rows, an
image is checked against its recorded sha256 when it is first decoded.

Leave-self-out (:mod:`jomed_fast.self_exclusion`, on by default): given the query records
(``search(..., queries=samples)``), index rows with a query's id or image digest (and, with
``near_duplicate``, rows whose image embedding is that close to it) are left out of every head's
top-k, which still holds k rows; ``Retrieved.excluded`` counts them per query and
``Retrieval.excluded`` over every search of the object.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .data.records import IndexRecord, image_identity, pixels_digest
from .prompts import Candidate
from .retriever.dual import Candidates, merge_heads
from .self_exclusion import ExclusionCount, RowKeys, SelfExclusion, keep_first_allowed

__all__ = ["Retrieval", "Retrieved"]


@dataclass
class Retrieved:
    """The merged top-k of Q queries.

    Attributes:
        ids: ``[Q, K]`` int64 index rows. scores: ``[Q, K]`` float32 similarities (comparable
        within a head only). heads: ``[Q][K]`` ``"text"`` / ``"image"``. candidates: ``[Q][K]``
        :class:`Candidate` (image, caption, record id) ready for ``CandidateScorer.score``.
        excluded: ``[Q]`` int64, the index rows left out of each query's search as the query itself.
    """

    ids: torch.Tensor
    scores: torch.Tensor
    heads: list
    candidates: list
    excluded: torch.Tensor


class Retrieval:
    """Search an index per head and turn the hits into ``Candidate`` lists.

    Args:
        index: an opened ``jomed_fast.index.Index``.
        records: the index records in index row order (e.g. ``load_synthetic(d).index``), checked
            against every stored row (see the module docstring); None reads the index's own
            ``records.jsonl`` (relative image paths resolved against the image root recorded at build).
        backend: ``Index.search`` backend (``"ops"`` exact, or ``"faiss"``).
        device: where exact search runs (``Index.to``): the index's heads are loaded there once,
            query embeddings stay there and ``Retrieved.ids`` / ``scores`` and ``embeddings`` come
            back on it (the reader's device, so stage 2 and inference never round-trip through the
            CPU); None keeps the index where it is (memory-mapped on the CPU unless moved).
        exclude_self: leave each query's own index rows (same record id or image sha256) out of its
            search when the query records are given to :meth:`search`.
        near_duplicate: also leave out rows whose image embedding has cosine >= this with the query's
            image-head embedding (``None``: off); see :mod:`jomed_fast.self_exclusion`.
    """

    def __init__(
        self,
        index,
        records: Sequence[IndexRecord] | None = None,
        *,
        backend: str = "ops",
        device=None,
        exclude_self: bool = True,
        near_duplicate: float | None = None,
    ):
        self.exclusion = SelfExclusion(exclude_self, near_duplicate)
        if device is not None:
            index.to(device)
        stored = index.records()
        own = records is None
        if records is None:
            records = [
                IndexRecord(id=row["id"], image_path=index.image_path(row), text=row.get("text", "")) for row in stored
            ]
        if len(records) != index.count:
            raise ValueError(f"records: expected {index.count} records (one per index row), got {len(records)}")
        if not own:
            for n, (record, row) in enumerate(zip(records, stored)):
                _check_row(n, record, row)
        self.index = index
        self.records = list(records)
        self.backend = backend
        self._stored = stored if own else None
        self._images: dict[int, object] = {}
        self._row_keys = RowKeys(stored) if self.exclusion.exclude_self else None
        self.excluded = ExclusionCount()

    def candidate(self, row: int) -> Candidate:
        """Index row -> ``Candidate(image, caption, id)``; the image is decoded once per row."""
        if not 0 <= row < len(self.records):
            raise ValueError(f"row: expected an index row in [0, {len(self.records)}), got {row}")
        record = self.records[row]
        if row not in self._images:
            if self._stored is not None:
                self._check_own_image(row, record)
            self._images[row] = record.load_image()
        return Candidate(self._images[row], record.text, id=record.id)

    def _check_own_image(self, n: int, record: IndexRecord) -> None:
        """The file an index row names is still the one it embedded (moved data, an edited image)."""
        from .identity import file_digest

        want = self._stored[n].get("image_sha256") if self._stored is not None else None
        if record.image_path is None or want is None:
            return
        where = f"index {self.index.path}: row {n} ({record.id!r})"
        if not Path(record.image_path).is_file():
            raise ValueError(
                f"{where}: image {record.image_path} not found (if the data moved, pass its records "
                "file at the new place: --index-records)"
            )
        have = file_digest(record.image_path)
        if have != want:
            raise ValueError(
                f"{where}: image {record.image_path} changed since the index was built "
                f"(sha256 {have[:12]}…, built from {want[:12]}…); rebuild the index"
            )

    def search(
        self, query_embeddings, k_text: int = 2, k_image: int = 2, *, queries: Sequence | None = None
    ) -> Retrieved:
        """Top ``k_text`` of the text head and ``k_image`` of the image head for Q queries.

        ``query_embeddings``: one ``[Q, D]`` tensor for both heads, or ``{"text": [Q, D], "image":
        [Q, D]}`` when each head has its own query encoder (``retriever.HeadEncoders``).
        ``queries``: the Q query records (``id``, ``image_path`` / ``image``): their own index rows
        are left out (``exclude_self``, ``near_duplicate``); ``None`` searches every row.
        """
        if k_text < 0 or k_image < 0 or k_text + k_image == 0:
            raise ValueError(f"k_text, k_image: expected >= 0 with a positive sum, got {k_text}, {k_image}")
        per_head = _per_head_queries(query_embeddings, self.device)
        n = per_head["text"].shape[0]
        own = self._own_rows(queries, per_head["image"]) if queries is not None else [[] for _ in range(n)]
        excluded = _padded(own, self.device)
        empty = (torch.zeros(n, 0, device=self.device), torch.zeros(n, 0, dtype=torch.int64, device=self.device))
        text = self._head("text", per_head["text"], k_text, excluded, queries) if k_text else empty
        image = self._head("image", per_head["image"], k_image, excluded, queries) if k_image else empty
        merged: Candidates = merge_heads(text, image)
        candidates = [[self.candidate(n) for n in row] for row in merged.ids.tolist()]
        counts = torch.tensor([len(rows) for rows in own], dtype=torch.int64)
        return Retrieved(
            ids=merged.ids, scores=merged.scores, heads=merged.heads, candidates=candidates, excluded=counts
        )

    def _head(self, head: str, q: torch.Tensor, k: int, excluded: torch.Tensor, queries) -> tuple:
        """One head's top ``k`` without each query's excluded rows: the top ``k + M`` searched (M the
        most rows any query excludes), the excluded dropped, the first ``k`` kept."""
        n = self.index.count
        if excluded.shape[1]:
            left = n - (excluded >= 0).sum(1)
            short = int(left.argmin())
            if int(left[short]) < k:
                raise ValueError(
                    f"k_{head}: expected at most {int(left[short])} (the index's {n} rows less the "
                    f"{n - int(left[short])} left out as query {queries[short].id!r} itself), got {k}"
                )
        wide = min(n, k + excluded.shape[1])
        scores, ids = self.index.search(q, wide, head=head, backend=self.backend)
        return keep_first_allowed(scores, ids.to(excluded.device), excluded, k)

    def own_rows(self, queries: Sequence) -> list[list[int]]:
        """Per query record, the index rows with its id or image digest (``exclude_self``; near
        duplicates need an embedding and are left to :meth:`search`), counted into :attr:`excluded`.
        Random retrieval draws around them."""
        return self._own_rows(queries, None)

    def _own_rows(self, queries: Sequence, image_queries: torch.Tensor | None) -> list[list[int]]:
        """Per query, the index rows that are the query itself (id, image digest and, given the
        query embeddings, near duplicates), counted into :attr:`excluded` by reason."""
        if image_queries is not None and len(queries) != image_queries.shape[0]:
            raise ValueError(
                f"queries: expected one record per query embedding ({image_queries.shape[0]}), got {len(queries)}"
            )
        rows: list[list[int]] = [[] for _ in queries]
        if not self.exclusion.active:
            return rows
        near = None
        if self.exclusion.near_duplicate is not None and image_queries is not None:
            near = self._near_duplicates(image_queries)
        count = self.excluded
        for j, query in enumerate(queries):
            by_id, by_image = self._row_keys.own_rows(query) if self._row_keys is not None else ([], [])
            seen = set(by_id) | set(by_image)
            close = [r for r in near[j] if r not in seen] if near is not None else []
            rows[j] = by_id + by_image + close
            count.by_id += len(by_id)
            count.by_image += len(by_image)
            count.near_duplicate += len(close)
            count.queries_with_exclusions += bool(rows[j])
        count.queries += len(queries)
        return rows

    def _near_duplicates(self, q: torch.Tensor) -> list[list[int]]:
        """Per query, the rows whose image embedding has cosine >= ``near_duplicate`` with ``q``
        (the image head searched with a doubling k until its last score falls below the threshold)."""
        threshold = self.exclusion.near_duplicate
        q = torch.nn.functional.normalize(q.float(), dim=-1)
        n, k = self.index.count, min(self.index.count, 16)
        while True:
            scores, ids = self.index.search(q, k, head="image", backend=self.backend)
            if k == n or bool((scores[:, -1] < threshold).all()):
                break
            k = min(n, 2 * k)
        keep = scores >= threshold
        return [row[mask].tolist() for row, mask in zip(ids.cpu(), keep.cpu())]

    def to(self, device) -> Retrieval:
        """Search on ``device`` from now on (``Index.to``: the heads copied there once); returns self."""
        self.index.to(device)
        return self

    @property
    def device(self) -> torch.device:
        """Where search runs and its results live (the index's device, for the ``ops`` backend)."""
        return self.index.device if self.backend == "ops" else torch.device("cpu")

    def embeddings(self, head: str, ids: torch.Tensor) -> torch.Tensor:
        """The fixed index embeddings of rows ``ids`` (any shape) on ``head``: ``[*ids.shape, D]``
        float32, on the device the head lives on."""
        x = self.index.head(head)
        return x[ids.reshape(-1).to(x.device)].float().reshape(*ids.shape, -1)


def _check_row(n: int, record, row: dict) -> None:
    """Raise ``ValueError`` unless ``record`` is what index row ``n`` was built from (id, caption, image)."""
    if record.id != row["id"]:
        raise ValueError(
            f"records: row {n} is {record.id!r} but the index has {row['id']!r} there "
            "(pass the records in the order the index was built from)"
        )
    if "text" in row and record.text != row["text"]:
        raise ValueError(
            f"records: row {n} ({record.id!r}) has the caption {record.text[:60]!r} but the index "
            f"embedded {row['text'][:60]!r}; rebuild the index from these records"
        )
    if "image_sha256" not in row and "pixels_sha256" not in row:
        return  # an index built before rows carried image digests: ids and captions only
    have = image_identity(record)
    if "pixels_sha256" in row and "pixels_sha256" not in have:
        have = {"pixels_sha256": pixels_digest(record.load_image())}
    key = next((k for k in ("image_sha256", "pixels_sha256") if k in row and k in have), None)
    if key is None:
        raise ValueError(
            f"records: row {n} ({record.id!r}) holds its pixels only, but the index recorded the "
            "sha256 of an image file; pass the records read from their JSONL (load_index_records)"
        )
    if have[key] != row[key]:
        raise ValueError(
            f"records: row {n} ({record.id!r}) has another image than the one the index embedded "
            f"({key} {have[key][:12]}…, index {row[key][:12]}…); rebuild the index from these records"
        )


def _padded(rows: list[list[int]], device) -> torch.Tensor:
    """``[Q, M]`` int64 rows per query, padded with -1 (no index row) to the longest list M."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), -1, dtype=torch.int64)
    for j, r in enumerate(rows):
        out[j, : len(r)] = torch.tensor(r, dtype=torch.int64)
    return out.to(device)


def _per_head_queries(query_embeddings, device: torch.device) -> dict:
    """``{"text": [Q, D], "image": [Q, D]}`` float32 on ``device`` from one tensor or a per-head mapping."""
    if isinstance(query_embeddings, torch.Tensor):
        q = query_embeddings.detach().float().to(device)
        return {"text": q, "image": q}
    if isinstance(query_embeddings, Mapping) and set(query_embeddings) == {"text", "image"}:
        out = {h: torch.as_tensor(query_embeddings[h]).detach().float().to(device) for h in ("text", "image")}
        if out["text"].shape[0] != out["image"].shape[0]:
            raise ValueError(
                f"query_embeddings: expected as many text as image queries, got "
                f"{out['text'].shape[0]} and {out['image'].shape[0]}"
            )
        return out
    got = sorted(query_embeddings) if isinstance(query_embeddings, Mapping) else type(query_embeddings).__name__
    raise TypeError(f"query_embeddings: expected a [Q, D] tensor or a mapping with keys 'text' and 'image', got {got}")
