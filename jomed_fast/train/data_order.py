"""Deterministic data order for the trainers: the permutation of epoch e is a pure function of
(seed, e), so a resumed run needs only its position (epoch, index in the epoch) to continue exactly.

``epoch_order(n, seed, epoch) -> list[int]``: ``torch.randperm(n)`` drawn from a fresh
``torch.Generator`` seeded with ``seed * 1_000_003 + epoch`` (``shuffle=False``: ``0..n-1``).
``epoch_batches(order, batch_size)``: consecutive slices, the last one possibly shorter (every
sample is seen once per epoch). Shared by the stage-2 trainer; stage 1 may use it too.
"""

from __future__ import annotations

import math

import torch

__all__ = ["batches_per_epoch", "epoch_batches", "epoch_order"]


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The order of the n samples in epoch ``epoch`` (0-based)."""
    if n < 0 or epoch < 0:
        raise ValueError(f"n, epoch: expected >= 0, got {n}, {epoch}")
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g).tolist()


def batches_per_epoch(n: int, batch_size: int) -> int:
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    return math.ceil(n / batch_size)


def epoch_batches(order: list[int], batch_size: int) -> list[list[int]]:
    """``order`` cut into batches of ``batch_size`` (the last one shorter when n is not a multiple)."""
    batches_per_epoch(len(order), batch_size)
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
