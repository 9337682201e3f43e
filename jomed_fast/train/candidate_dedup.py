"""Stage 2's candidates without copies: of a query's retrieved rows, the first (highest-scored) of
each content kept and the list filled from further down, so the K candidates stay K distinct ones.

Content per head (``dedup_key``): the **text** head's candidates are the same when their captions
are; the **image** head's when their images are (the pixels' or the file's sha256,
``pair_scores.image_key``). A reader sees two such candidates as one, so copies only flatten the
target distribution (K copies of one caption: a uniform target and no gradient).

``first_distinct(rows, key, k)`` picks, per query, the positions of the first ``k`` distinct rows
of its ranked list. When the list holds fewer than ``k`` distinct rows (the index holds fewer
distinct contents than ``k``, less the query's own rows), the remaining slots are filled with the
highest-ranked copies left out, so K stays K and those copies stay (counted as ``kept``); the
positions are returned in rank order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .pair_scores import image_key

__all__ = ["dedup_key", "first_distinct"]


def dedup_key(record, head: str) -> str | None:
    """What makes two index records the same candidate for ``head``: caption or image content."""
    return record.text if head == "text" else image_key(record)


def first_distinct(
    rows: Sequence[Sequence[int]], key: Callable[[int], object], k: int
) -> tuple[list[list[int]], int, int, int]:
    """``(positions, removed, kept, short)``: per query the rank positions of its ``k`` candidates,
    the copies left out of the first ``k`` ranks in all, the copies kept because too few distinct
    rows remained, and how many queries had fewer than ``k`` distinct rows in ``rows``."""
    positions, removed, kept, short = [], 0, 0, 0
    for row in rows:
        seen: set = set()
        chosen: list[int] = []
        skipped: list[int] = []
        for j, r in enumerate(row):
            if len(chosen) == k:
                break
            c = key(int(r))
            if c in seen:
                skipped.append(j)
                continue
            seen.add(c)
            chosen.append(j)
        if len(chosen) < k:
            short += 1
            fill = skipped[: k - len(chosen)]
            kept += len(fill)
            chosen = sorted(chosen + fill)
        removed += sum(1 for j in skipped if j < k and j not in chosen)
        positions.append(chosen)
    return positions, removed, kept, short
