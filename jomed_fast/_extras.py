"""Optional dependencies: imported where a path needs them, with an error naming the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingDependency", "require"]


class MissingDependency(ImportError):
    """An optional dependency a requested path needs is not installed (the message says which extra)."""


def require(module: str, extras: tuple[str, ...], purpose: str) -> ModuleType:
    """Import ``module`` or raise ``MissingDependency`` naming the pip extras that install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        commands = " or ".join(f"pip install 'jomed_fast[{e}]'" for e in extras)
        raise MissingDependency(
            f"{purpose} needs the optional dependency {module!r}, which is not installed ({exc}); install it with {commands}"
        ) from exc
