r"""The predictions file: read it line by line, resume it only from the same inputs, never lose it.

``<out>`` is JSONL, one :class:`~jomed_fast.analysis.prediction_records.PredictionRecord` per query. Beside it:

* ``<out>.meta.json``: the identity of the run that writes it (``jomed_fast.identity``: a digest
  per input, the result-changing options by name). A rerun appends to ``<out>`` only when its
  identity equals the stored one; otherwise ``IdentityMismatch`` names the inputs that changed.
* ``<out>.lock``: held (``fcntl.flock``, exclusive, non-blocking) for as long as a run writes
  ``<out>``; a second run on the same ``<out>`` is refused, naming the lock, instead of
  interleaving its lines. The file stays after the run: removing it would let a third run lock a
  fresh inode while a second still holds the old one.

What is never done: truncating or replacing an ``<out>`` that holds predictions. An ``<out>``
without its sidecar (another program's file, or a run whose sidecar was lost) is refused as it is;
an ``<out>`` that is one of the run's inputs is refused before anything is written
(:func:`refuse_inputs_as_outputs`). The only bytes ever cut are a torn last line (no newline: a
crash mid-append), so appends start on a line boundary. An ``<out>`` with a sidecar and no
complete record holds nothing to lose and starts over with the current identity.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from ..analysis.prediction_records import PredictionRecord
from ..identity import check_identity, read_identity, write_identity

__all__ = [
    "PredictionsFile",
    "check_output_free",
    "lock_path",
    "meta_path",
    "read_predictions",
    "refuse_inputs_as_outputs",
]


def meta_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".meta.json")


def lock_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".lock")


# --------------------------------------------------------------------------------------------- reading
def _scan(path: Path) -> tuple[list[PredictionRecord], int]:
    """(complete records, byte length of the complete lines). A last line without its newline (a
    crash mid-append) is left out; a line that is not a record, or repeats a query id, is an error
    naming ``path:line``."""
    out: list[PredictionRecord] = []
    good, first_line = 0, {}  # type: tuple[int, dict[str, int]]  # query id -> the line that wrote it
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                break
            good += len(line)
            if not line.strip():
                continue
            try:
                rec = PredictionRecord.from_dict(json.loads(line))
            except (ValueError, TypeError) as exc:
                msg = " ".join(str(exc).split())[:160]
                raise ValueError(f"{path}:{lineno}: not a prediction record ({msg})") from None
            if rec.query_id in first_line:
                raise ValueError(
                    f"{path}:{lineno}: query id {rec.query_id!r} already on line "
                    f"{first_line[rec.query_id]} (one record per query)"
                )
            first_line[rec.query_id] = lineno
            out.append(rec)
    return out, good


def read_predictions(path: str | os.PathLike) -> list[PredictionRecord]:
    """The complete records of a predictions JSONL, in file order (a torn last line is ignored).

    Raises ``ValueError`` naming ``path:line`` for a line that is not a prediction record or repeats
    a query id, ``FileNotFoundError`` when ``path`` does not exist.
    """
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{p}: is a folder; expected a predictions JSONL file")
    return _scan(p)[0]  # a missing file: open's FileNotFoundError, which names it


# --------------------------------------------------------------------------------------------- inputs
def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def refuse_inputs_as_outputs(
    outputs: Mapping[str, str | os.PathLike], inputs: Mapping[str, str | os.PathLike | None]
) -> None:
    """Raise ``ValueError`` when an output would overwrite an input or land inside an input folder.

    ``outputs`` / ``inputs``: ``{name for the message: path}`` (inputs that are None are skipped).
    Compared by resolved path (symlinks followed) and, for files that exist, by inode (hard links).
    Nothing is written here, so a refusal leaves every file as it was.
    """
    for out_name, out in outputs.items():
        real_out = os.path.realpath(out)
        for in_name, given in inputs.items():
            if given is None or not os.path.exists(given):
                continue
            real_in = os.path.realpath(given)
            same = real_out == real_in or (os.path.exists(out) and os.path.samefile(out, given))
            if same or (os.path.isdir(real_in) and _inside(real_out, real_in)):
                where = "is" if same else "lies inside"
                raise ValueError(
                    f"{out_name}: {out} {where} the input {in_name} ({given}); writing it would "
                    "destroy an input: choose another output path"
                )


def check_output_free(out: str | os.PathLike, name: str = "out") -> None:
    """What can be checked before any model loads: ``out`` is not a folder, an existing ``out`` has
    its sidecar, and no other run holds its lock (the lock itself is taken by :class:`PredictionsFile`)."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"{name}: {out} is a folder; expected a predictions JSONL file")
    if out.exists() and not meta_path(out).exists():
        raise _no_sidecar(out)
    if lock_path(out).exists():
        os.close(_take_lock(out))


def _no_sidecar(out: Path) -> ValueError:
    return ValueError(
        f"{out}: exists without its sidecar {meta_path(out).name} (written by another program, or "
        "its sidecar was lost), so it cannot be resumed; it was left untouched: move it aside to "
        "keep it, remove it to start over, or write to another path"
    )


# --------------------------------------------------------------------------------------------- writing
def _take_lock(out: Path) -> int:
    """An open descriptor of ``<out>.lock`` holding its exclusive flock (closing it releases the lock)."""
    lock = lock_path(out)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        raise ValueError(
            f"{lock}: held by another run writing {out}; wait for it to finish or write to another path"
        ) from None
    return fd


class PredictionsFile:
    """One run's hold on ``out``: the lock, the identity check and the appends (module docstring).

    Use as a context manager; ``done`` maps the query ids already written to their records::

        with PredictionsFile(out, identity) as pf:
            todo = [s for s in samples if s.id not in pf.done]
            pf.append(records)  # flushed and fsynced; a query id already written is refused
    """

    def __init__(
        self,
        out: str | os.PathLike,
        identity: Mapping[str, object],
        *,
        name: str = "out_path",
        query_ids: Iterable[str] | None = None,
    ):
        self.out, self.identity, self.name = Path(out), dict(identity), name
        self.query_ids = None if query_ids is None else set(query_ids)
        self.done: dict[str, PredictionRecord] = {}
        self._fd: int | None = None

    def __enter__(self) -> PredictionsFile:
        if self.out.is_dir():
            raise ValueError(f"{self.name}: {self.out} is a folder; expected a predictions JSONL file")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._fd = _take_lock(self.out)
        try:
            self._open()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> None:
        out, meta = self.out, meta_path(self.out)
        if not out.exists():
            self._start_over()
            return
        stored = read_identity(meta)
        if stored is None:
            raise _no_sidecar(out)
        records, good = _scan(out)
        if not records:  # nothing to lose: begin again with the current inputs
            self._start_over()
            return
        check_identity(stored, self.identity, f"predictions {out}")
        stray = [r.query_id for r in records if self.query_ids is not None and r.query_id not in self.query_ids]
        if stray:
            raise ValueError(f"{out}: holds query ids that are not among the samples given ({stray[:3]})")
        with open(out, "r+b") as f:  # cut a torn tail so that appends start on a line boundary
            f.truncate(good)
        self.done = {r.query_id: r for r in records}

    def _start_over(self) -> None:
        write_identity(meta_path(self.out), self.identity)  # the sidecar first: an out never lacks it
        with open(self.out, "wb") as f:
            f.flush()
            os.fsync(f.fileno())

    def append(self, records: Sequence[PredictionRecord]) -> None:
        """Append ``records`` (flushed and fsynced); a query id already in the file is an error."""
        if self._fd is None:
            raise ValueError(f"{self.name}: {self.out} is not held; use PredictionsFile as a context manager")
        seen = set()
        for r in records:
            if r.query_id in self.done or r.query_id in seen:
                raise ValueError(f"records: query id {r.query_id!r} is already in {self.out}")
            seen.add(r.query_id)
        try:
            with open(self.out, "a") as f:
                f.writelines(json.dumps(r.to_dict()) + "\n" for r in records)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:  # a full disk: say which file (the write error itself names none)
            raise OSError(exc.errno, exc.strerror, str(self.out)) from exc
        self.done.update((r.query_id, r) for r in records)
