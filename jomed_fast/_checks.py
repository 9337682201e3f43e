"""Checks of plain Python arguments shared across the package (the ops keep theirs in
``ops/_checks.py``). Every check returns the value it accepts and raises ``ValueError`` as
``<name>: expected <what>, got <value!r>``.

A bool is never an int here: ``True`` is an ``int`` to Python, but ``k=True`` or ``limit=False`` is
a mistake, not a count. NumPy integers are not ints either (JSON configs and CLI flags never hold
them); a caller that takes them says so itself.
"""

from __future__ import annotations

from typing import Any, Literal, TypeGuard, overload

__all__ = ["check_int", "is_int", "is_number", "positive_int"]


def is_int(value: Any) -> TypeGuard[int]:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An ``int`` or ``float`` that is not a ``bool`` (inf and nan included; range checks are the caller's)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int_wording(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f"an int in {lo}..{hi}"
    if lo is not None:
        return f"an int >= {lo}"
    if hi is not None:
        return f"an int <= {hi}"
    return "an int"


@overload
def check_int(
    name: str,
    value: Any,
    lo: int | None = ...,
    hi: int | None = ...,
    *,
    optional: Literal[False] = ...,
    expected: str | None = ...,
) -> int: ...


@overload
def check_int(
    name: str,
    value: Any,
    lo: int | None = ...,
    hi: int | None = ...,
    *,
    optional: bool,
    expected: str | None = ...,
) -> int | None: ...


def check_int(
    name: str,
    value: Any,
    lo: int | None = None,
    hi: int | None = None,
    *,
    optional: bool = False,
    expected: str | None = None,
) -> int | None:
    """``value`` if it is an int (not a bool) with ``lo <= value <= hi`` (a bound of ``None`` is open),
    or ``None`` when ``optional``; else ``ValueError("<name>: expected <expected>, got <value!r>")``.

    ``expected`` defaults to ``"an int >= lo"``, ``"an int <= hi"``, ``"an int in lo..hi"`` or
    ``"an int"``, followed by ``" or None"`` when ``optional``; pass it where the range needs a word
    of context (``"an int in 1..N = 40 (or None for exact search)"``).
    """
    if optional and value is None:
        return None
    if is_int(value) and (lo is None or value >= lo) and (hi is None or value <= hi):
        return value
    if expected is None:
        expected = _int_wording(lo, hi) + (" or None" if optional else "")
    raise ValueError(f"{name}: expected {expected}, got {value!r}")


@overload
def positive_int(name: str, value: Any, *, optional: Literal[False] = ...) -> int: ...


@overload
def positive_int(name: str, value: Any, *, optional: bool) -> int | None: ...


def positive_int(name: str, value: Any, *, optional: bool = False) -> int | None:
    """``check_int(name, value, 1)`` worded ``"a positive int"`` (``" or None"`` when ``optional``)."""
    return check_int(name, value, 1, optional=optional, expected="a positive int" + (" or None" if optional else ""))
