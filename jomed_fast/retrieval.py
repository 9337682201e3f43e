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
:class:`~jomed_fast.prompts.Candidate` objects (image, caption, id) the scorer takes. Record images
are decoded on first use and kept (the same index rows come back across queries and epochs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .data.records import IndexRecord
from .prompts import Candidate
from .retriever.dual import Candidates, merge_heads

__all__ = ["Retrieval", "Retrieved"]


@dataclass
class Retrieved:
    """The merged top-k of Q queries.

    Attributes:
        ids: ``[Q, K]`` int64 index rows. scores: ``[Q, K]`` float32 similarities (comparable
        within a head only). heads: ``[Q][K]`` ``"text"`` / ``"image"``. candidates: ``[Q][K]``
        :class:`Candidate` (image, caption, record id) ready for ``CandidateScorer.score``.
    """

    ids: torch.Tensor
    scores: torch.Tensor
    heads: list
    candidates: list


class Retrieval:
    """Search an index per head and turn the hits into ``Candidate`` lists.

    Args:
        index: an opened ``jomed_fast.index.Index``.
        records: the index records in index row order (e.g. ``load_synthetic(d).index``); None reads
            the index's own ``records.jsonl`` (relative image paths resolved against the index folder).
        backend: ``Index.search`` backend (``"ops"`` exact, or ``"faiss"``).
    """

    def __init__(self, index, records: Sequence[IndexRecord] | None = None, *, backend: str = "ops"):
        if records is None:
            records = [self._record_from_row(index.path, row) for row in index.records()]
        if len(records) != index.count:
            raise ValueError(f"records: expected {index.count} records (one per index row), got {len(records)}")
        stored = index.records()
        for n in (0, len(records) // 2, len(records) - 1) if records else ():
            if records[n].id != stored[n]["id"]:
                raise ValueError(f"records: row {n} is {records[n].id!r} but the index has {stored[n]['id']!r} there "
                                 "(pass the records in the order the index was built from)")
        self.index = index
        self.records = list(records)
        self.backend = backend
        self._images: dict[int, object] = {}

    @staticmethod
    def _record_from_row(root: Path, row: dict) -> IndexRecord:
        path = row.get("image_path")
        if path is not None and not Path(path).is_absolute():
            path = str(Path(root) / path)
        return IndexRecord(id=row["id"], image_path=path, text=row.get("text", ""))

    def candidate(self, row: int) -> Candidate:
        """Index row -> ``Candidate(image, caption, id)``; the image is decoded once per row."""
        if not 0 <= row < len(self.records):
            raise ValueError(f"row: expected an index row in [0, {len(self.records)}), got {row}")
        record = self.records[row]
        if row not in self._images:
            self._images[row] = record.load_image()
        return Candidate(self._images[row], record.text, id=record.id)

    def search(self, query_embeddings, k_text: int = 2, k_image: int = 2) -> Retrieved:
        """Top ``k_text`` of the text head and ``k_image`` of the image head for Q queries.

        ``query_embeddings``: one ``[Q, D]`` tensor for both heads, or ``{"text": [Q, D], "image":
        [Q, D]}`` when each head has its own query encoder (``retriever.HeadEncoders``).
        """
        if k_text < 0 or k_image < 0 or k_text + k_image == 0:
            raise ValueError(f"k_text, k_image: expected >= 0 with a positive sum, got {k_text}, {k_image}")
        per_head = _per_head_queries(query_embeddings)
        n = per_head["text"].shape[0]
        empty = (torch.zeros(n, 0), torch.zeros(n, 0, dtype=torch.int64))
        text = self.index.search(per_head["text"], k_text, head="text", backend=self.backend) if k_text else empty
        image = self.index.search(per_head["image"], k_image, head="image", backend=self.backend) if k_image else empty
        merged: Candidates = merge_heads(text, image)
        candidates = [[self.candidate(int(n)) for n in row] for row in merged.ids]
        return Retrieved(ids=merged.ids, scores=merged.scores, heads=merged.heads, candidates=candidates)

    def embeddings(self, head: str, ids: torch.Tensor) -> torch.Tensor:
        """The fixed index embeddings of rows ``ids`` (any shape) on ``head``: ``[*ids.shape, D]`` float32."""
        if head not in self.index.embeddings:
            raise ValueError(f"head: expected 'image' or 'text', got {head!r}")
        emb = self.index.embeddings[head]
        flat = ids.reshape(-1).cpu().numpy()
        return torch.from_numpy(emb[flat].astype("float32")).reshape(*ids.shape, -1)


def _per_head_queries(query_embeddings) -> dict:
    """``{"text": [Q, D], "image": [Q, D]}`` float32 CPU from one tensor or a per-head mapping."""
    if isinstance(query_embeddings, torch.Tensor):
        q = query_embeddings.detach().float().cpu()
        return {"text": q, "image": q}
    if isinstance(query_embeddings, Mapping) and set(query_embeddings) == {"text", "image"}:
        out = {h: torch.as_tensor(query_embeddings[h]).detach().float().cpu() for h in ("text", "image")}
        if out["text"].shape[0] != out["image"].shape[0]:
            raise ValueError(f"query_embeddings: expected as many text as image queries, got "
                             f"{out['text'].shape[0]} and {out['image'].shape[0]}")
        return out
    got = sorted(query_embeddings) if isinstance(query_embeddings, Mapping) else type(query_embeddings).__name__
    raise TypeError(f"query_embeddings: expected a [Q, D] tensor or a mapping with keys 'text' and 'image', got {got}")
