"""Manifests of the model directories the project writes: sha256 and size of every file, checked on load.

Every directory written through ``_files.replace_dir_atomically`` (LoRA adapters, training
checkpoints, encoders, the offline readers) carries ``jomed_manifest.json``::

    {"format": "jomed-manifest-v1", "files": {"<relative path>": {"size": 123, "sha256": "..."}}}

``verify_dir(path)`` rehashes every listed file and raises a one-line ``CorruptFile`` naming the
first one that is missing, has another size or another hash (one flipped bit in a weight file is
caught); files the manifest does not list are not read by the loaders and are ignored. A directory
without a manifest (a checkpoint downloaded from the hub) is not verified unless ``required``.

``directory_digest(path)`` is the directory's content identity: the sha256 of its (verified)
manifest, so two directories with the same files have the same digest wherever they lie. Both
memoise per (file, size, mtime): a directory is hashed once per process, not once per call.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

__all__ = [
    "MANIFEST",
    "CorruptFile",
    "build_manifest",
    "cached_sha256",
    "directory_digest",
    "verify_dir",
    "write_manifest",
]

MANIFEST = "jomed_manifest.json"
_FORMAT = "jomed-manifest-v1"
_HASHES: dict[tuple[str, int, int], str] = {}


class CorruptFile(ValueError):
    """A file does not match the manifest it was written with (or a manifest is unreadable)."""


def cached_sha256(path: Path) -> str:
    """sha256 of a file's bytes, memoised per (resolved path, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def build_manifest(root: str | os.PathLike) -> dict:
    """The manifest of every regular file under ``root`` (symlinks and the manifest itself excluded)."""
    root = Path(root)
    files = {}
    for parent, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            p = Path(parent) / name
            rel = p.relative_to(root).as_posix()
            if rel == MANIFEST or p.is_symlink() or not p.is_file():
                continue
            files[rel] = {"size": p.stat().st_size, "sha256": cached_sha256(p)}
    return {"format": _FORMAT, "files": files}


def write_manifest(root: str | os.PathLike) -> dict:
    """Write ``root/jomed_manifest.json`` (called on a directory not yet visible at its final path)."""
    manifest = build_manifest(root)
    path = Path(root) / MANIFEST
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return manifest


def _read_manifest(root: Path) -> dict | None:
    path = root / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CorruptFile(f"{path}: unreadable manifest ({exc})") from exc
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != _FORMAT
        or not isinstance(manifest.get("files"), dict)
    ):
        raise CorruptFile(f"{path}: expected a {_FORMAT} manifest, got {str(manifest)[:80]!r}")
    return manifest


def verify_dir(root: str | os.PathLike, *, required: bool = False) -> dict | None:
    """Check every file ``root``'s manifest lists; return the manifest (``None`` when there is none
    and not ``required``). Raises ``CorruptFile`` naming the first file that does not match."""
    root = Path(root)
    manifest = _read_manifest(root)
    if manifest is None:
        if required:
            raise CorruptFile(f"{root}: has no {MANIFEST}; it was not written by jomed_fast, or is incomplete")
        return None
    for rel, want in sorted(manifest["files"].items()):
        p = root / rel
        if not p.is_file():
            raise CorruptFile(f"{p}: listed in {root / MANIFEST} but missing")
        size = p.stat().st_size
        if size != want.get("size"):
            raise CorruptFile(
                f"{p}: {size} bytes, its manifest says {want.get('size')}: the file is truncated or changed"
            )
        if cached_sha256(p) != want.get("sha256"):
            raise CorruptFile(
                f"{p}: sha256 differs from its manifest's: the file is corrupt or was changed after it was written"
            )
    return manifest


def directory_digest(root: str | os.PathLike) -> str:
    """sha256 of ``root``'s verified manifest (built in memory where the directory has none)."""
    manifest = verify_dir(root) or build_manifest(root)
    text = json.dumps(manifest["files"], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _clear_memo() -> None:  # for tests
    _HASHES.clear()
