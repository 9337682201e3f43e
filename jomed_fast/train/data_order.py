"""The data order of both trainers: the permutation of epoch e is a pure function of (seed, e), so a
resumed run needs only its position (epoch, examples of the epoch already seen) to continue exactly.

``epoch_order(n, seed, epoch) -> list[int]``: ``torch.randperm(n)`` drawn from a fresh
``torch.Generator`` seeded with ``seed * 1_000_003 + epoch`` (``shuffle=False``: ``0..n-1``).
``epoch_batches(order, batch_size)``: consecutive slices, the last one possibly shorter (every
sample is seen once per epoch). :class:`DataOrder` walks that stream step by step: a step is up to
``grad_accum`` consecutive micro-batches and never crosses the end of an epoch.
"""

from __future__ import annotations

import math

import torch

__all__ = ["DataOrder", "batches_per_epoch", "epoch_batches", "epoch_order", "steps_per_epoch"]


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


def steps_per_epoch(n: int, batch_size: int, grad_accum: int = 1) -> int:
    """Optimizer steps of one epoch: ``ceil(ceil(n / batch_size) / grad_accum)``."""
    if grad_accum < 1:
        raise ValueError(f"grad_accum: expected >= 1, got {grad_accum}")
    return math.ceil(batches_per_epoch(n, batch_size) / grad_accum)


def epoch_batches(order: list[int], batch_size: int) -> list[list[int]]:
    """``order`` cut into batches of ``batch_size`` (the last one shorter when n is not a multiple)."""
    batches_per_epoch(len(order), batch_size)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class DataOrder:
    """The training stream of ``n`` examples, epoch after epoch (see the module docstring).

    Stateless apart from a cache of the current epoch's permutation: the position is passed in
    (``epoch``, ``position``) and comes back from :meth:`advance`, so the trainer's run state (and
    its checkpoint) holds it.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        if n < 1:
            raise ValueError(f"n: expected at least one training example, got {n}")
        self.n, self.seed, self.shuffle = int(n), int(seed), bool(shuffle)
        self._cached: tuple[int, list[int]] | None = None

    def permutation(self, epoch: int) -> list[int]:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, epoch_order(self.n, self.seed, epoch, self.shuffle))
        return self._cached[1]

    def next_step(self, epoch: int, position: int, batch_size: int, grad_accum: int = 1) -> list[list[int]]:
        """The micro-batches (example indices) of the step starting at ``position`` of ``epoch``."""
        perm = self.permutation(epoch)
        out: list[list[int]] = []
        i = position
        while len(out) < grad_accum and i < self.n:
            out.append(perm[i : i + batch_size])
            i += batch_size
        return out

    def advance(self, epoch: int, position: int, count: int) -> tuple[int, int, bool]:
        """``(epoch, position, epoch_ended)`` after ``count`` more examples."""
        position += int(count)
        if position >= self.n:
            return epoch + 1, 0, True
        return epoch, position, False
