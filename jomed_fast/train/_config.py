"""``JsonConfig``: what every option dataclass of the trainers shares — a JSON round trip that
refuses unknown options (a typo in a config file must not be silently ignored) and ``replace``."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["JsonConfig"]


class JsonConfig:
    """Mixin for ``@dataclass`` option classes: ``to_dict``, ``from_dict`` (strict) and ``replace``."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        if not isinstance(d, dict):
            raise TypeError(f"{cls.__name__}: expected a dict of options, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown options {unknown}; expected some of {sorted(known)}")
        return cls(**d)

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)
