"""``SyntheticDataset``: all splits and the index of one config, held in memory."""

from __future__ import annotations

from dataclasses import dataclass

from ...tasks import Task
from .config import SPLITS, SyntheticConfig


@dataclass(eq=False)
class SyntheticDataset:
    """All splits and the index of one config, in memory (or read back by ``load_synthetic``)."""

    config: SyntheticConfig
    task: Task
    train: list
    val: list
    test: list
    index: list

    def split(self, name: str) -> list:
        if name not in (*SPLITS, "index"):
            raise ValueError(f"split: expected one of {(*SPLITS, 'index')}, got {name!r}")
        return getattr(self, name)
