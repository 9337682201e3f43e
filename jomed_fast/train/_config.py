"""``JsonConfig``: what every option dataclass of the trainers shares — a JSON round trip that
refuses unknown options (a typo in a config file must not be silently ignored), ``replace``, and
one way to check an option: every check raises ``ValueError`` as
``config.<option>: expected <what>, got <value>``."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, cast

from .._checks import check_int, is_number

__all__ = ["JsonConfig"]


class JsonConfig:
    """Mixin for ``@dataclass`` option classes: ``to_dict``, ``from_dict`` (strict), ``replace`` and
    the ``_check_*`` helpers their ``__post_init__`` uses (frozen dataclasses included)."""

    # the subclasses are dataclasses; the mixin itself is not, so the checker sees it through Any
    def to_dict(self) -> dict:
        return dataclasses.asdict(cast(Any, self))

    @classmethod
    def from_dict(cls, d: dict):
        if not isinstance(d, dict):
            raise TypeError(f"{cls.__name__}: expected a dict of options, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cast(Any, cls))}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown options {unknown}; expected some of {sorted(known)}")
        return cls(**d)

    def replace(self, **changes: Any):
        return dataclasses.replace(cast(Any, self), **changes)

    # ------------------------------------------------------------------------------ checks
    @staticmethod
    def _fail(name: str, expected: str, got: Any) -> None:
        raise ValueError(f"config.{name}: expected {expected}, got {got!r}")

    def _check_int(self, name: str, lo: int, optional: bool = False) -> None:
        check_int(f"config.{name}", getattr(self, name), lo, optional=optional)

    def _check_float(
        self,
        name: str,
        lo: float,
        hi: float = math.inf,
        *,
        lo_open: bool = False,
        hi_open: bool = False,
        optional: bool = False,
    ) -> None:
        """A finite number in the range (stored as a float, so the JSON of equal options is equal)."""
        v = getattr(self, name)
        if optional and v is None:
            return
        ok = is_number(v) and math.isfinite(v)
        ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if not ok:
            rng = f"{'>' if lo_open else '>='} {lo}" + (
                f" and {'<' if hi_open else '<='} {hi}" if hi < math.inf else ""
            )
            self._fail(name, f"a finite float {rng}" + (" or None" if optional else ""), v)
        object.__setattr__(self, name, float(v))  # frozen dataclasses too

    def _check_choice(self, name: str, choices: tuple) -> None:
        if getattr(self, name) not in choices:
            self._fail(name, f"one of {choices}", getattr(self, name))

    def _check_bool(self, *names: str) -> None:
        for name in names:
            if not isinstance(getattr(self, name), bool):
                self._fail(name, "a bool", getattr(self, name))
