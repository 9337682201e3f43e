r"""``ScoreCache``: the exact, persistent reader-score cache of stage 2 (append-only, crash-safe).

In stage 2 the reader is frozen and deterministic (eval mode), so the class log-probabilities of
a (query, candidate) pair, :math:`\log p_C(c \mid z_k, q) \in \mathbb{R}^C`, never change during
the run. The cache stores that whole row once per pair, keyed by

    (reader fingerprint, task identity, layout, query key, candidate key)

(``layout`` also names the scoring mode, e.g. ``"shared_query|first_token|norm"``; the keys are
the pair's *content*, :func:`.pair_scores.query_key` / :func:`.pair_scores.record_key`: the
images' bytes, the question and the caption, never ids or paths), so each pair is scored once for
the whole run — and for any later run with the same reader and the same contents — and a cache
reused after the reader or a record changed serves none of the old scores.

File format (little-endian), one file, only ever appended to::

    file   := b"JOMEDSC1" frame*
    frame  := b"FRM1" u32 payload_len u32 crc32(payload) payload
    payload:= u32 json_len  json  float32[n, C]
    json   := {"ns": [fingerprint, task, layout], "C": C, "pairs": [[query key, candidate key], ...],
               "seconds": [reader seconds per pair, ...]}

A frame holds all the pairs one batch scored and is written with one ``write`` then ``fsync``: a
batch is in the cache entirely or not at all. On open every frame is checked (magic, length,
CRC32). A torn tail — the last frame cut short by a crash mid-write — is truncated away
(``stats.truncated_bytes``). A damaged frame with whole frames after it loses only itself: the
reader resynchronises at the next frame magic that starts a valid frame, the damaged bytes are
dropped (the file is rewritten without them, atomically), and a :class:`CacheDamageWarning`
(stderr) names the file and how many frames and bytes were lost (``stats.dropped_frames``,
``stats.dropped_bytes``); their pairs are scored again when met. Keys already present are never
appended again (``append`` skips them), so the file holds one record per distinct pair; a
duplicate met on open (which this writer never produces) is counted in
``stats.duplicates_on_disk`` and the first copy kept. One writer at a time: the file is locked
(``flock``) while open.

Statistics (``stats``): ``hits`` / ``misses`` of ``lookup`` calls, ``scored_pairs`` and
``reader_seconds`` of ``append`` calls in this process, and ``saved_seconds`` — the sum, over the
hits, of the reader seconds each hit pair cost when it was scored (stored with the record), i.e.
the reader time the cache spared this process. No pickle: JSON + raw float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import struct
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .._files import make_temp_file

__all__ = ["CacheDamageWarning", "CacheStats", "Namespace", "ScoreCache"]

FILE_MAGIC = b"JOMEDSC1"
FRAME_MAGIC = b"FRM1"
_FRAME_HEAD = struct.Struct("<4sII")
_U32 = struct.Struct("<I")

Namespace = tuple  # (reader fingerprint, task identity, layout): str, str, str


class CacheDamageWarning(UserWarning):
    """Whole frames of a score cache were damaged and dropped on open (their pairs get rescored)."""


@dataclasses.dataclass
class CacheStats:
    """Counters of one open cache (see the module docstring)."""

    records: int = 0  # distinct pairs on disk (all namespaces)
    hits: int = 0
    misses: int = 0
    scored_pairs: int = 0  # appended by this process
    reader_seconds: float = 0.0  # reader time of the appended pairs
    saved_seconds: float = 0.0  # reader time the hits would have cost (their recorded seconds)
    truncated_bytes: int = 0  # torn (or damaged) tail removed on open
    dropped_frames: int = 0  # damaged frames before valid ones, dropped on open
    dropped_bytes: int = 0
    duplicates_on_disk: int = 0

    @property
    def lookups(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float | None:
        """hits / (hits + misses), or None before any lookup."""
        return self.hits / self.lookups if self.lookups else None

    @property
    def seconds_per_pair(self) -> float | None:
        return self.reader_seconds / self.scored_pairs if self.scored_pairs else None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(lookups=self.lookups, hit_rate=self.hit_rate, seconds_per_pair=self.seconds_per_pair)
        return d


def _check_namespace(ns) -> tuple[str, str, str]:
    if not (isinstance(ns, tuple) and len(ns) == 3 and all(isinstance(x, str) and x for x in ns)):
        raise ValueError(f"namespace: expected (reader fingerprint, task, layout) as three non-empty str, got {ns!r}")
    return ns


class ScoreCache:
    """Append-only store ``(namespace, query id, candidate id) -> float32 [C]`` (module docstring).

    Args:
        path: the cache file (created with its parent directory when missing).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.stats = CacheStats()
        self._rows: dict[tuple, np.ndarray] = {}
        self._seconds: dict[tuple, float] = {}
        self._file = open(self.path, "a+b")  # noqa: SIM115 - held open for appends, closed by close()
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise ValueError(f"path: the score cache {str(self.path)!r} is open in another process") from None
        self._load()

    # ------------------------------------------------------------------------------------ open
    def _load(self) -> None:
        f = self._file
        f.seek(0)
        data = f.read()
        if len(data) < len(FILE_MAGIC) or data[: len(FILE_MAGIC)] != FILE_MAGIC:
            if data and not FILE_MAGIC.startswith(data[: len(FILE_MAGIC)]):
                raise ValueError(f"path: {str(self.path)!r} is not a jomed_fast score cache (bad magic)")
            self._truncate(0, len(data))  # empty, or a torn header
            f.write(FILE_MAGIC)
            self._sync()
            return
        spans, damaged, off = [], [], len(FILE_MAGIC)
        while off < len(data):
            frame = self._parse_frame(data, off)
            if frame is not None:
                self._add_frame(frame)
                spans.append((off, frame[0]))
                off = frame[0]
                continue
            resume_at = self._next_frame(data, off + 1)
            if resume_at is None:  # the tail: cut at the first bad byte
                self._cut_tail(data, off)
                break
            damaged.append((off, resume_at))
            off = resume_at
        self.stats.records = len(self._rows)
        if damaged:
            self._drop(data, spans, damaged)

    def _add_frame(self, frame) -> None:
        _end, ns, _C, pairs, seconds, rows = frame
        for (qid, cid), sec, row in zip(pairs, seconds, rows):
            key = (ns, qid, cid)
            if key in self._rows:
                self.stats.duplicates_on_disk += 1
                continue
            self._rows[key] = row
            self._seconds[key] = float(sec)

    def _next_frame(self, data: bytes, start: int) -> int | None:
        """The offset of the next valid frame at or after ``start``, or None."""
        at = data.find(FRAME_MAGIC, start)
        while at != -1:
            if self._parse_frame(data, at) is not None:
                return at
            at = data.find(FRAME_MAGIC, at + 1)
        return None

    def _cut_tail(self, data: bytes, off: int) -> None:
        """Truncate at ``off``. A torn frame (what a crash mid-write leaves: the start of a frame whose
        bytes run past the end of the file) goes silently; anything else there is reported."""
        tail = data[off:]
        if len(tail) < _FRAME_HEAD.size:
            torn = FRAME_MAGIC.startswith(tail[: len(FRAME_MAGIC)])
        else:
            magic, length, _crc = _FRAME_HEAD.unpack_from(tail, 0)
            torn = magic == FRAME_MAGIC and _FRAME_HEAD.size + length > len(tail)
        self._truncate(off, len(tail))
        if not torn:
            self._warn(max(1, tail.count(FRAME_MAGIC)), len(tail), [off])

    def _drop(self, data: bytes, spans: list, damaged: list) -> None:
        """Rewrite the file with its valid frames only (atomically, the lock moving with it), and warn."""
        frames = sum(max(1, data.count(FRAME_MAGIC, a, b)) for a, b in damaged)
        nbytes = sum(b - a for a, b in damaged)
        self.stats.dropped_frames += frames
        self.stats.dropped_bytes += nbytes
        fd, tmp = make_temp_file(self.path.parent, prefix=self.path.name + ".", suffix=".tmp")
        new = os.fdopen(fd, "r+b")
        try:
            fcntl.flock(new.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            new.write(FILE_MAGIC + b"".join(data[a:b] for a, b in spans))
            new.flush()
            os.fsync(new.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            new.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._file.close()
        self._file = new
        self._warn(frames, nbytes, [a for a, _ in damaged])

    def _warn(self, frames: int, nbytes: int, offsets: list[int]) -> None:
        warnings.warn(
            f"score cache {str(self.path)!r}: dropped {frames} damaged frame(s), {nbytes} bytes at offset(s) "
            f"{offsets}; every other frame is kept and the lost pairs will be scored again",
            CacheDamageWarning,
            stacklevel=5,
        )

    @staticmethod
    def _parse_frame(data: bytes, off: int):
        """The frame at ``off`` or None when it is torn or corrupt."""
        if off + _FRAME_HEAD.size > len(data):
            return None
        magic, length, crc = _FRAME_HEAD.unpack_from(data, off)
        start = off + _FRAME_HEAD.size
        end = start + length
        if magic != FRAME_MAGIC or end > len(data) or length < _U32.size:
            return None
        payload = data[start:end]
        if zlib.crc32(payload) != crc:
            return None
        (jlen,) = _U32.unpack_from(payload, 0)
        try:
            head = json.loads(payload[_U32.size : _U32.size + jlen])
            ns = tuple(head["ns"])
            C = int(head["C"])
            pairs = [tuple(p) for p in head["pairs"]]
            seconds = head["seconds"]
            rows = np.frombuffer(payload[_U32.size + jlen :], dtype="<f4").reshape(len(pairs), C)
        except (ValueError, KeyError, TypeError):
            return None
        if len(seconds) != len(pairs):
            return None
        return end, ns, C, pairs, seconds, rows

    def _truncate(self, at: int, nbytes: int) -> None:
        self._file.truncate(at)
        self._file.seek(at)
        self.stats.truncated_bytes += nbytes
        self._sync()

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    # ------------------------------------------------------------------------------------ API
    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key) -> bool:
        return key in self._rows

    def keys(self) -> list[tuple]:
        """Every stored key ``(namespace, query id, candidate id)``, in file order."""
        return list(self._rows)

    def get(self, ns: Namespace, query_id: str, candidate_id: str) -> np.ndarray | None:
        """The stored row (float32 ``[C]``, read-only) or None; counts nothing."""
        return self._rows.get((ns, query_id, candidate_id))

    def lookup(self, ns: Namespace, pairs: Sequence[tuple[str, str]]) -> list[np.ndarray | None]:
        """Rows of ``pairs`` (None for a miss); counts hits, misses and the seconds the hits saved."""
        _check_namespace(ns)
        out = []
        for qid, cid in pairs:
            key = (ns, qid, cid)
            row = self._rows.get(key)
            if row is None:
                self.stats.misses += 1
            else:
                self.stats.hits += 1
                self.stats.saved_seconds += self._seconds[key]
            out.append(row)
        return out

    def append(self, ns: Namespace, pairs: Sequence[tuple[str, str]], rows, seconds: float) -> int:
        """Store the ``[n, C]`` rows of ``pairs`` that are not stored yet, as one fsync'ed frame.

        ``seconds``: the reader time that scored these n pairs (recorded as seconds / n per pair).
        Returns how many records were written (pairs already stored, or repeated, are skipped).
        """
        ns = _check_namespace(ns)
        rows = np.ascontiguousarray(np.asarray(rows, dtype=np.float32))
        if rows.ndim != 2 or rows.shape[0] != len(pairs):
            raise ValueError(f"rows: expected shape [n, C] with n = len(pairs) = {len(pairs)}, got {rows.shape}")
        if not (np.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"seconds: expected a finite float >= 0, got {seconds}")
        per_pair = float(seconds) / max(1, len(pairs))
        keep, seen = [], set()
        for i, (qid, cid) in enumerate(pairs):
            if not (isinstance(qid, str) and isinstance(cid, str)):
                raise TypeError(f"pairs[{i}]: expected (query id, candidate id) as str, got {(qid, cid)!r}")
            key = (ns, qid, cid)
            if key not in self._rows and key not in seen:
                seen.add(key)
                keep.append(i)
        self.stats.scored_pairs += len(pairs)
        self.stats.reader_seconds += float(seconds)
        if not keep:
            return 0
        new = rows[keep]
        head = json.dumps(
            {
                "ns": list(ns),
                "C": int(rows.shape[1]),
                "pairs": [list(pairs[i]) for i in keep],
                "seconds": [per_pair] * len(keep),
            }
        ).encode()
        payload = _U32.pack(len(head)) + head + new.astype("<f4").tobytes()
        frame = _FRAME_HEAD.pack(FRAME_MAGIC, len(payload), zlib.crc32(payload)) + payload
        self._file.seek(0, os.SEEK_END)
        self._file.write(frame)
        self._sync()
        for j, i in enumerate(keep):
            key = (ns, pairs[i][0], pairs[i][1])
            self._rows[key] = new[j]
            self._seconds[key] = per_pair
        self.stats.records = len(self._rows)
        return len(keep)

    def close(self) -> None:
        if not self._file.closed:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # best effort; the lock dies with the process anyway
        with contextlib.suppress(Exception):
            self.close()
