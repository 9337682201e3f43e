"""Content identities of resumable artefacts: what went in, hashed, so a resume never mixes inputs.

An identity is a flat JSON object ``{input name: digest}``; each digest is a sha256 of the input's
*content* (a file's bytes, a directory's manifest, a reader's weights and adapter, the canonical
JSON of the options that change results), never of its path. An artefact (predictions, a run
directory, a score cache, an index) stores its identity when it starts and resumes only when the
identity of the current inputs equals it; otherwise ``check_identity`` names which inputs changed::

    identity = {"reader": reader_fingerprint(reader), "samples": file_digest(samples_path),
                "options": json_digest(options_that_change_results)}
    check_identity(stored, identity, "predictions runs/preds.jsonl")

Options that cannot change a result (batch size, progress bars, thread counts) are left out by the
caller, so changing them never blocks a resume.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

from ._files import atomic_write_via
from ._manifest import cached_sha256, directory_digest

__all__ = [
    "IdentityMismatch",
    "bytes_digest",
    "check_identity",
    "directory_digest",
    "file_digest",
    "json_digest",
    "read_identity",
    "write_identity",
]


class IdentityMismatch(ValueError):
    """An artefact was made from other inputs than the ones given now."""


def bytes_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def json_digest(value) -> str:
    """sha256 of the canonical JSON of ``value`` (sorted keys, no whitespace)."""
    return bytes_digest(json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode())


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (memoised per path, size and mtime)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    return cached_sha256(p)


def check_identity(stored: Mapping[str, object], current: Mapping[str, object], artefact: str) -> None:
    """Raise ``IdentityMismatch`` naming every input whose digest differs between ``stored`` and ``current``."""
    changed = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
    if changed:
        raise IdentityMismatch(
            f"{artefact}: was made from other inputs ({', '.join(changed)} changed); "
            "write to a new output, or remove it to start over"
        )


def read_identity(path: str | os.PathLike) -> dict | None:
    """The identity stored at ``path`` (JSON), ``None`` when there is none."""
    p = Path(path)
    if not p.exists():
        return None
    try:
        value = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{p}: unreadable identity file ({exc})") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{p}: expected a JSON object of input digests, got {type(value).__name__}")
    return value


def write_identity(path: str | os.PathLike, identity: Mapping[str, object]) -> None:
    text = json.dumps(dict(identity), indent=1, sort_keys=True) + "\n"
    atomic_write_via(path, lambda tmp: Path(tmp).write_text(text))
