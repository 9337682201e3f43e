"""Atomic file and directory writes shared by every layer (no torch; no project import but the manifest).

A reader of the destination sees the old content or the new one, never a half-written file:
content goes to a temporary sibling first and is moved into place with ``os.replace``.

Permissions: what these helpers leave behind has the mode a plain ``open(path, "w")`` or
``os.mkdir(path)`` would give it (``0o666 & ~umask`` for files, ``0o777 & ~umask`` for
directories), so a team sharing runs through group-readable directories can read them. ``tempfile.mkstemp`` / ``mkdtemp`` create 0600 / 0700
whatever the umask, and ``os.replace`` keeps that mode, so the temporary siblings are made here
with ``os.open(..., 0o666)`` / ``os.mkdir(..., 0o777)`` instead and the kernel applies the umask
at creation. Some writers called on the temporary path make their own temporary file and
rename it over that path (safetensors' ``save_file``, and so every ``save_pretrained``: 0600), so
what ``write`` / ``fill`` leave is given the mode the temporary sibling was created with.

The umask is never read: reading it means ``os.umask(x)`` then restoring it, and the umask is
process-wide, so another thread creating a file in between would get ``x``. The kernel applies it
when the temporary sibling is created, and the sibling's own mode is the reference afterwards
(a file's mode is its directory's without the execute bits: ``(0o777 & ~u) & 0o666``).
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import Callable

from ._manifest import write_manifest

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_via",
    "make_temp_dir",
    "make_temp_file",
    "replace_dir_atomically",
    "sha256_file",
]

# Names tried before giving up (tempfile tries TMP_MAX = 10000; 8 random bytes rarely collide once).
_ATTEMPTS = 100
# As tempfile.mkstemp opens its files: never through a symlink planted at the name, not inherited
# by child processes, binary on Windows.
_FILE_FLAGS = (
    os.O_RDWR
    | os.O_CREAT
    | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)


def _create(dir: str | os.PathLike, prefix: str, suffix: str, create: Callable[[str], object]):
    for _ in range(_ATTEMPTS):
        path = os.path.join(dir, f"{prefix}{secrets.token_hex(8)}{suffix}")
        try:
            return create(path), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name {prefix}*{suffix} in {dir}")


def make_temp_file(dir: str | os.PathLike, prefix: str = "", suffix: str = "") -> tuple[int, str]:
    """``tempfile.mkstemp`` with the mode of a plain ``open(path, "w")``: ``(fd, path)``, opened read-write."""
    return _create(dir, prefix, suffix, lambda p: os.open(p, _FILE_FLAGS, 0o666))


def make_temp_dir(dir: str | os.PathLike, prefix: str = "") -> str:
    """``tempfile.mkdtemp`` with the mode of a plain ``os.mkdir(path)``; returns its path."""
    return _create(dir, prefix, "", lambda p: os.mkdir(p, 0o777))[1]


def _mode(path: str | os.PathLike) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _give_mode(path: str | os.PathLike, mode: int) -> None:
    """``path`` (a file) gets ``mode`` (no execute bits), keeping the execute bits it has where ``mode``
    lets the same class read (what ``0o777 & ~umask`` would allow an executable)."""
    current = _mode(path)
    wanted = mode | (current & ((mode & 0o444) >> 2))
    if current != wanted:
        os.chmod(path, wanted)


def _give_modes(root: str | os.PathLike, dir_mode: int) -> None:
    """Every directory under ``root`` gets ``dir_mode`` and every file the matching file mode
    (symlinks are left alone: ``chmod`` would change their targets)."""
    file_mode = dir_mode & 0o666
    for parent, dirs, files in os.walk(os.fspath(root)):
        for name in dirs:
            p = os.path.join(parent, name)
            if not os.path.islink(p) and _mode(p) != dir_mode:
                os.chmod(p, dir_mode)
        for name in files:
            p = os.path.join(parent, name)
            if not os.path.islink(p):
                _give_mode(p, file_mode)


def atomic_write_via(path: str | os.PathLike, write: Callable[[str], object], *, fsync: bool = False) -> None:
    """Call ``write(tmp_path)`` on a temporary sibling of ``path`` (parent folders made), then move
    it onto ``path`` with the mode a plain ``open(path, "w")`` would give it, whatever ``write`` did.

    A reader never sees a partial file; a killed writer leaves at most a hidden ``.<name>.*.tmp``
    sibling. ``fsync`` flushes the content to disk before the move (power-loss safety of small
    files that others are keyed on: manifests, predictions).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = make_temp_file(path.parent, prefix=f".{path.name}.", suffix=".tmp")
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    os.close(fd)
    try:
        write(tmp)
        _give_mode(tmp, mode)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> None:
    """``data`` at ``path``, written atomically (``atomic_write_via``)."""
    atomic_write_via(path, lambda tmp: Path(tmp).write_bytes(data), fsync=fsync)


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = False) -> None:
    """``text`` (UTF-8) at ``path``, written atomically (``atomic_write_via``)."""
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def replace_dir_atomically(out: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Build a directory with ``fill(tmp_dir)`` beside ``out``, then swap it into place.

    An existing ``out`` is moved aside first and removed after the swap, so a crash leaves either
    the old directory or the new one at ``out``. What ``fill`` wrote gets the modes a plain
    ``os.mkdir`` / ``open`` would give it, and a manifest (``_manifest``: sha256 per file) that
    the loaders verify.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(make_temp_dir(out.parent, prefix=f".{out.name}."))
    try:
        fill(tmp)
        write_manifest(tmp)
        _give_modes(tmp, _mode(tmp))
        if out.exists():
            trash = Path(make_temp_dir(out.parent, prefix=f".{out.name}.old."))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
