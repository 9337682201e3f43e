"""The pack stage of a ``score`` call: B queries' split prompts -> images, packed batch, rows.

``pack(processor, splits, query_images)`` collects every distinct image into an ``ImageTable``
(preprocessed, placeholders known), expands each prompt part's placeholders, packs the B queries
with the C++ packer (``jomed_fast.packing.pack_candidates_batch``; M-RoPE positions when the
reader has them, ``ReaderProcessor.mrope``) and numbers the distinct prefixes: a ``Packing``.
``SuffixRows.from_packing`` flattens its B·K candidate rows (``r = b·K + k``) into what scoring a
chunk of rows reads. Everything here is on the CPU; nothing runs the model.
"""

from __future__ import annotations

import dataclasses

import torch

from ..packing import PackedBatch, QueryCandidates, pack_candidates_batch
from ..prompts import QueryPrompts
from .images import ImageTable


@dataclasses.dataclass
class Packing:
    """What the pack stage produced for B queries of K candidates.

    Attributes:
        table: the call's distinct images, preprocessed (placeholders known), not yet encoded.
        batch: the packed prefixes and suffix rows (shapes in ``jomed_fast.packing``).
        prefix_uids: ``[B]`` lists: the image uids of query b's prefix, in placeholder order.
        row_uids: ``[B·K]`` lists: the image uids of row ``b·K + k``'s segment.
        prefix_of: ``[B]`` long: the distinct prefix (token ids and images) query b holds,
            numbered in order of first appearance.
        first_query: ``[U]``: the first query holding each distinct prefix.
    """

    table: ImageTable
    batch: PackedBatch
    prefix_uids: list[list[int]]
    row_uids: list[list[int]]
    prefix_of: torch.Tensor
    first_query: list[int]

    @property
    def prefix_length(self) -> int:
        """Pm: the longest prefix (0 when every prefix is empty)."""
        return int(self.batch.prefix_input_ids.shape[1])

    def prefix_positions(self, queries: list[int], device) -> torch.Tensor:
        """The position ids of the prefixes of ``queries``: ``[3, n, Pm]`` M-RoPE or ``[n, Pm]``."""
        if self.batch.prefix_mrope_position_ids is not None:
            return self.batch.prefix_mrope_position_ids[:, queries].to(device)
        Pm = self.prefix_length
        return torch.arange(Pm, device=device)[None].expand(len(queries), Pm)


def pack(processor, splits: list[QueryPrompts], query_images: list) -> Packing:
    """Stage 2 of ``CandidateScorer.score``: ``splits`` (``prompts.split_query`` of each query),
    ``query_images`` the B query images (to name errors: a query image or a candidate's)."""
    table = ImageTable(processor)

    def uid(img, b, k=None):
        if img is query_images[b]:
            return table.add(img, f"query_images[{b}]")
        return table.add(img, f"candidates[{b}][{k}].image")

    prefix_uids = [[uid(img, b) for img in s.prefix_images] for b, s in enumerate(splits)]
    seg_uids = [
        [[uid(img, b, k) for img in imgs] for k, imgs in enumerate(s.segment_images)] for b, s in enumerate(splits)
    ]
    table.preprocess()
    queries = [_query_candidates(table, s, prefix_uids[b], seg_uids[b]) for b, s in enumerate(splits)]
    batch = pack_candidates_batch(
        queries, pad_token_id=processor.pad_token_id, spatial_merge_size=processor.merge_size, mrope=processor.mrope
    )
    keys: dict[tuple, int] = {}
    prefix_of = [keys.setdefault((tuple(s.prefix_ids), tuple(prefix_uids[b])), len(keys)) for b, s in enumerate(splits)]
    return Packing(
        table=table,
        batch=batch,
        prefix_uids=prefix_uids,
        row_uids=[uids for per_query in seg_uids for uids in per_query],
        prefix_of=torch.tensor(prefix_of, dtype=torch.long),
        first_query=[prefix_of.index(u) for u in range(len(keys))],
    )


def _query_candidates(
    table: ImageTable, split: QueryPrompts, prefix_uids: list[int], seg_uids: list[list[int]]
) -> QueryCandidates:
    """One query's ``QueryCandidates``: placeholders expanded, image spans and (M-RoPE) grids."""
    expand = table.processor.expand_placeholders
    prefix, p_spans = expand(split.prefix_ids, [table.placeholders[u] for u in prefix_uids])
    segs: list[torch.Tensor] = []
    c_spans: list[tuple[int, int, int]] = []
    for k, (seg, uids) in enumerate(zip(split.segments, seg_uids)):
        ids, spans = expand(seg, [table.placeholders[u] for u in uids])
        segs.append(torch.tensor(ids, dtype=torch.long))
        c_spans.extend((k, s, n) for s, n in spans)
    lengths = torch.tensor([0] + [len(s) for s in segs], dtype=torch.long)
    return QueryCandidates(
        prefix_ids=torch.tensor(prefix, dtype=torch.long),
        candidate_ids=torch.cat(segs) if segs else torch.empty(0, dtype=torch.long),
        candidate_offsets=torch.cumsum(lengths, 0),
        prefix_image_spans=torch.tensor(p_spans, dtype=torch.long).reshape(-1, 2),
        prefix_image_grid_thw=table.grids(prefix_uids),
        candidate_image_spans=torch.tensor(c_spans, dtype=torch.long).reshape(-1, 3),
        candidate_image_grid_thw=table.grids([u for uids in seg_uids for u in uids]),
    )


@dataclasses.dataclass
class SuffixRows:
    """The B·K candidate rows flattened (``r = b·K + k``), CPU tensors; L the longest suffix.

    Attributes:
        ids: ``[R, L]`` segment tokens, right-padded; ``lengths``: ``[R]`` n_r ≥ 1.
        positions: ``[R, L]`` 1-D positions continuing the prefix; ``mrope_positions``
            ``[3, R, L]`` and ``rope_deltas`` ``[R]`` for M-RoPE readers, else None.
        query: ``[R]`` the row's query b; ``prefix_lengths``: ``[R]`` its prefix's length P_b.
        image_uids: ``[R]`` lists, the images of the row's segment (``Packing.row_uids``).
    """

    ids: torch.Tensor
    lengths: torch.Tensor
    positions: torch.Tensor
    mrope_positions: torch.Tensor | None
    rope_deltas: torch.Tensor | None
    query: torch.Tensor
    prefix_lengths: torch.Tensor
    image_uids: list[list[int]]

    @classmethod
    def from_packing(cls, packing: Packing) -> SuffixRows:
        b = packing.batch
        B, K, L = b.input_ids.shape
        R = B * K
        lengths = b.suffix_lengths.reshape(R)
        if int(lengths.min()) < 1:  # split_query never leaves a segment empty (the answer cue follows)
            raise RuntimeError("layout: a candidate's prompt segment is empty; the answer position is undefined")
        query = torch.arange(R) // K
        return cls(
            ids=b.input_ids.reshape(R, L),
            lengths=lengths,
            positions=b.position_ids.reshape(R, L),
            mrope_positions=b.mrope_position_ids.reshape(3, R, L) if b.mrope_position_ids is not None else None,
            rope_deltas=b.rope_deltas.reshape(R) if b.rope_deltas is not None else None,
            query=query,
            prefix_lengths=b.prefix_lengths[query],
            image_uids=packing.row_uids,
        )

    def chunk_positions(self, chunk: torch.Tensor, L: int, node_depths: torch.Tensor, device) -> torch.Tensor:
        """Position ids of rows ``chunk`` padded to ``L`` slots, then N class-trie nodes of depths
        ``node_depths`` (``[N]``, ≥ 1): a node at the position its token has right after the prompt,
        ``P + n + depth − 1`` (M-RoPE: text after the prompt, that plus the row's rope delta, on all
        three axes). ``[Rc, L + N]`` or, M-RoPE, ``[3, Rc, L + N]``, on ``device``."""
        ends = (self.prefix_lengths[chunk] + self.lengths[chunk]).to(device)
        node_pos = ends[:, None] + node_depths.to(device)[None] - 1  # [Rc, N]
        if self.mrope_positions is None or self.rope_deltas is None:
            return torch.cat([self.positions[chunk, :L].to(device), node_pos], dim=1)
        node_pos = node_pos + self.rope_deltas[chunk].to(device)[:, None]
        nodes = node_pos[None].expand(3, len(chunk), node_pos.shape[1])
        return torch.cat([self.mrope_positions[:, chunk, :L].to(device), nodes], dim=2)
