"""JSONL records in the reference's format: samples and index records.

Formats (one JSON object per line; blank lines are ignored; unknown keys are kept in ``extra``):

* sample: ``{"id"?: str, "image_path": str, "question"?: str|null, "answer" | "answers": ...}``
  — ``answer`` is the answer text (``"Yes"``, ``"3"``, ``"0, 3, 14"``); ``answers`` (the
  reference's key for classification files) may be a string or a list. A sample without ``id``
  gets ``"<file stem>:<line>"``.
* index record: ``{"id": str, "image_path": str, "text": str}`` (PMC-OA, ROCO, MIMIC-CXR all map
  to it).

``image_path`` may be absolute or relative; a relative path is resolved against ``image_root``
(default: the JSONL file's folder). Records hold the resolved absolute path.

Bad data raises :class:`~jomed_fast.data.errors.DataError` naming the file, the line and the
record: a malformed JSON line, a line that is not an object, a missing or mistyped field, a
duplicate id, a missing or unreadable image, an answer outside the task's label set. With
``skip_bad=True`` those lines are skipped instead; the result's ``skipped`` lists the errors
(``n_skipped`` counts them) and a warning summarises them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._checks import is_int
from ..tasks import Task, get_task
from .errors import DataError
from .io import PathLike, atomic_write_jsonl, check_image, load_image, save_png

logger = logging.getLogger(__name__)

VERIFY_MODES = ("none", "exists", "open", "decode")


def _image_of(record, what: str) -> np.ndarray:
    """The record's in-memory image, else the decoded file at ``image_path``; a file that is gone or
    does not decode is a :class:`DataError` naming it and the record (one line, never a traceback)."""
    if record.image is not None:
        return record.image
    if record.image_path is None:
        raise ValueError(f"{what} {record.id!r} has neither an image nor an image_path")
    try:
        return load_image(record.image_path)
    except FileNotFoundError:
        raise DataError(record.image_path, "image file not found", record=record.id) from None
    except Exception as e:  # noqa: BLE001  (PIL.UnidentifiedImageError, truncated files, permissions)
        raise DataError(record.image_path, f"unreadable image ({type(e).__name__}: {e})", record=record.id) from None


@dataclass(eq=False)
class Sample:
    """A question about an image, with its answer.

    ``answer`` is the answer text (canonical for the task when one was given); ``label`` the class
    index, or a frozenset of indices for multi-label tasks, or ``None`` (open VQA / no task).
    ``image`` is an ``[H, W, 3]`` uint8 array when loaded (or generated), else ``None``:
    :meth:`load_image` reads it from ``image_path``.
    """

    id: str
    image_path: str | None
    answer: str
    label: Any = None
    question: str | None = None
    image: np.ndarray | None = field(default=None, repr=False)
    extra: dict = field(default_factory=dict)

    def load_image(self) -> np.ndarray:
        return _image_of(self, "sample")


@dataclass(eq=False)
class IndexRecord:
    """An (image, caption) pair of the retrieval index."""

    id: str
    image_path: str | None
    text: str
    image: np.ndarray | None = field(default=None, repr=False)
    extra: dict = field(default_factory=dict)

    def load_image(self) -> np.ndarray:
        return _image_of(self, "index record")


class Loaded(list):
    """The records read from a file (a ``list``), plus what was skipped with ``skip_bad``.

    ``path``: the file; ``image_root``: the folder its relative ``image_path`` values were resolved
    against (what an index stores its image paths relative to), or ``None``.
    """

    def __init__(
        self,
        records: Iterable = (),
        *,
        path: str = "",
        skipped: Sequence[DataError] = (),
        image_root: str | None = None,
    ):
        super().__init__(records)
        self.path = path
        self.image_root = image_root
        self.skipped: list[DataError] = list(skipped)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------
def _iter_lines(path: Path):
    try:
        f = open(path, "r", encoding="utf-8")
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except OSError as e:
        raise DataError(path, f"cannot open: {e}") from None
    with f:
        lineno = 0
        while True:
            try:
                line = f.readline()
            except UnicodeDecodeError as e:
                raise DataError(path, f"not UTF-8 text ({e})", line=lineno + 1) from None
            if not line:
                return
            lineno += 1
            yield lineno, line


def _resolve_image(path: Path, lineno: int, rid: str, image_path: str, root: Path, verify: str, load: bool):
    p = Path(image_path)
    if not p.is_absolute():
        p = root / p
    p = Path(os.path.normpath(p))
    image = None
    try:
        if load:
            if not p.exists():
                raise FileNotFoundError(f"image file not found: {p}")
            image = load_image(p)
        elif verify != "none":
            check_image(p, verify)
    except FileNotFoundError:
        raise DataError(path, f"missing image {image_path!r} (looked for {p})", line=lineno, record=rid) from None
    except Exception as e:  # PIL.UnidentifiedImageError, truncated files, permission errors
        raise DataError(
            path, f"unreadable image {image_path!r} ({type(e).__name__}: {e})", line=lineno, record=rid
        ) from None
    return str(p), image


def _read(
    path: PathLike,
    parse_row: Callable[[Path, int, dict], Any],
    *,
    skip_bad: bool,
    what: str,
    image_root: Path,
) -> Loaded:
    path = Path(path)
    out: list = []
    skipped: list[DataError] = []
    seen: dict[str, int] = {}
    for lineno, line in _iter_lines(path):
        if not line.strip():
            continue
        try:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, f"malformed JSON ({e.msg} at column {e.colno})", line=lineno) from None
            if not isinstance(row, dict):
                raise DataError(path, f"expected a JSON object, got {type(row).__name__}", line=lineno)
            rec = parse_row(path, lineno, row)
            if rec.id in seen:
                raise DataError(path, f"duplicate id (first at line {seen[rec.id]})", line=lineno, record=rec.id)
            seen[rec.id] = lineno
            out.append(rec)
        except DataError as e:
            if not skip_bad:
                raise
            skipped.append(e)
    log_skipped(path, skipped, f"{what} line(s)", len(skipped) + len(out))
    return Loaded(out, path=str(path), skipped=skipped, image_root=os.path.abspath(image_root))


def log_skipped(path, skipped: Sequence[DataError], what: str, total: int | None = None) -> None:
    """One warning for the records a ``skip_bad`` read left out, grouped by reason (details dropped)."""
    if not skipped:
        return
    reasons = Counter(re.sub(r"\s*\(.*", "", e.reason) for e in skipped)
    of = f" of {total}" if total is not None else ""
    logger.warning(
        "%s: skipped %d bad %s%s: %s",
        path,
        len(skipped),
        what,
        of,
        ", ".join(f"{n} x {r}" for r, n in reasons.most_common()),
    )


def _get_str(path: Path, lineno: int, row: dict, key: str, rid: str | None, *, required: bool = True):
    if key not in row or row[key] is None:
        if required:
            raise DataError(path, f"missing {key!r}", line=lineno, record=rid)
        return None
    v = row[key]
    if not isinstance(v, str):
        raise DataError(path, f"{key!r} must be a string, got {type(v).__name__}", line=lineno, record=rid)
    return v


def _answer_text(task: Task | None, raw: Any) -> str:
    if isinstance(raw, (list, tuple)):
        sep = task.separator if task is not None else ", "
        return sep.join(str(x) for x in raw)
    return str(raw)


def load_samples(
    path: PathLike,
    task: Task | str | None = None,
    *,
    skip_bad: bool = False,
    verify_images: str = "open",
    load_images: bool = False,
    image_root: PathLike | None = None,
) -> Loaded:
    """Read a sample JSONL file.

    Args:
        path: the JSONL file.
        task: a :class:`Task` (or its name). With a label set, every answer must be in it (else a
            ``DataError``), ``label`` is filled and ``answer`` is made canonical
            (``task.format_answer``). Without a task, answers are kept as written.
        skip_bad: skip bad lines (and count them in ``result.skipped``) instead of raising.
        verify_images: ``"none"``, ``"exists"``, ``"open"`` (header; default) or ``"decode"`` (the
            full decode a later ``load_image()`` does: a truncated or half-written file is then a bad
            line, which ``skip_bad`` skips, instead of an error in the middle of a run).
        load_images: decode every image into ``Sample.image`` (implies ``"decode"``).
        image_root: folder for relative ``image_path`` values (default: the file's folder).
    """
    if verify_images not in VERIFY_MODES:
        raise ValueError(f"verify_images: expected one of {VERIFY_MODES}, got {verify_images!r}")
    if isinstance(task, str):
        task = get_task(task)
    if task is not None and not isinstance(task, Task):
        raise TypeError(f"task: expected a Task, a task name or None, got {type(task).__name__}")
    root = Path(image_root) if image_root is not None else Path(path).parent

    def parse_row(p: Path, lineno: int, row: dict) -> Sample:
        rid = row.get("id", None)
        if rid is None:
            rid = f"{p.stem}:{lineno}"
        elif not (isinstance(rid, str) or is_int(rid)):
            raise DataError(p, f"'id' must be a string, got {type(rid).__name__}", line=lineno)
        rid = str(rid)
        image_path = _get_str(p, lineno, row, "image_path", rid)
        question = _get_str(p, lineno, row, "question", rid, required=False)
        has_a, has_as = row.get("answer") is not None, row.get("answers") is not None
        if not has_a and not has_as:
            raise DataError(p, "missing 'answer' (or 'answers')", line=lineno, record=rid)
        raw = row["answer"] if has_a else row["answers"]
        for key in ("answer", "answers"):
            v = row.get(key)
            if v is not None and not (isinstance(v, (str, list)) or is_int(v)):
                raise DataError(
                    p, f"{key!r} must be a string or a list, got {type(v).__name__}", line=lineno, record=rid
                )
        label = None
        if task is not None and task.has_label_set:
            try:
                label = task.encode_answer(raw)
                if has_a and has_as and task.encode_answer(row["answers"]) != label:
                    raise ValueError(f"'answer' {row['answer']!r} and 'answers' {row['answers']!r} disagree")
            except (ValueError, TypeError) as e:
                raise DataError(p, str(e), line=lineno, record=rid) from None
            answer = task.format_answer(label)
        else:
            answer = _answer_text(task, raw)
        resolved, image = _resolve_image(p, lineno, rid, image_path, root, verify_images, load_images)
        extra = {k: v for k, v in row.items() if k not in ("id", "image_path", "question", "answer", "answers")}
        return Sample(
            id=rid, image_path=resolved, answer=answer, label=label, question=question, image=image, extra=extra
        )

    return _read(path, parse_row, skip_bad=skip_bad, what="sample", image_root=root)


def load_index_records(
    path: PathLike,
    *,
    skip_bad: bool = False,
    verify_images: str = "open",
    load_images: bool = False,
    image_root: PathLike | None = None,
) -> Loaded:
    """Read an index-record JSONL file (``{id, image_path, text}`` per line); see :func:`load_samples`."""
    if verify_images not in VERIFY_MODES:
        raise ValueError(f"verify_images: expected one of {VERIFY_MODES}, got {verify_images!r}")
    root = Path(image_root) if image_root is not None else Path(path).parent

    def parse_row(p: Path, lineno: int, row: dict) -> IndexRecord:
        rid = row.get("id")
        if rid is None:
            raise DataError(p, "missing 'id'", line=lineno)
        if not (isinstance(rid, str) or is_int(rid)):
            raise DataError(p, f"'id' must be a string, got {type(rid).__name__}", line=lineno)
        rid = str(rid)
        image_path = _get_str(p, lineno, row, "image_path", rid)
        text = _get_str(p, lineno, row, "text", rid)
        resolved, image = _resolve_image(p, lineno, rid, image_path, root, verify_images, load_images)
        extra = {k: v for k, v in row.items() if k not in ("id", "image_path", "text")}
        return IndexRecord(id=rid, image_path=resolved, text=text, image=image, extra=extra)

    return _read(path, parse_row, skip_bad=skip_bad, what="index record", image_root=root)


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
# an id that is its own file name everywhere: lower case (case-insensitive file systems), no
# leading dot (hidden), no trailing dot (Windows drops it), short enough for any file system
_PLAIN = re.compile(r"[a-z0-9_-][a-z0-9._-]{0,98}[a-z0-9_-]|[a-z0-9_-]")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


def safe_filename(record_id: str) -> str:
    """A file name (without extension) for a record id; distinct ids get distinct names, also on
    case-insensitive file systems.

    A plain id (lower-case letters, digits, ``.``, ``_``, ``-``; at most 100 characters; no leading
    or trailing dot; not a Windows device name) is its own name, so the names of such ids are the
    ones earlier versions wrote. Any other id is cleaned (other characters -> ``_``, cut to 64) and
    gets ``~`` plus 16 hex digits of its sha256 (``case/1`` -> ``case_1~aad44ef547977edb``, ``case_1`` ->
    ``case_1``): ``~`` is never in a plain name, so the two kinds never meet. Files written under the
    older names keep loading: the JSONL names each file.
    """
    if _PLAIN.fullmatch(record_id) and record_id.split(".")[0] not in _WINDOWS_RESERVED:
        return record_id
    cleaned = _SAFE.sub("_", record_id).strip("._")[:64] or "record"
    return f"{cleaned}~{hashlib.sha256(record_id.encode('utf-8')).hexdigest()[:16]}"


def _image_ref(rec: Sample | IndexRecord, out_path: Path, images_dir: Path | None) -> str:
    base = out_path.parent
    if rec.image is not None and images_dir is not None:
        target = images_dir / f"{safe_filename(rec.id)}.png"
        save_png(target, rec.image)
        return os.path.relpath(target, base).replace(os.sep, "/")
    if rec.image_path is None:
        raise ValueError(f"record {rec.id!r}: no image_path and no in-memory image (or no images_dir) to write")
    p = Path(rec.image_path)
    if p.is_absolute():
        try:
            return os.path.relpath(p, base).replace(os.sep, "/")
        except ValueError:  # different drive (Windows)
            return str(p)
    return str(p)


def write_samples(
    samples: Iterable[Sample],
    path: PathLike,
    *,
    images_dir: PathLike | None = None,
) -> int:
    """Write samples as JSONL (atomically); in-memory images go to ``images_dir`` as PNG.

    ``image_path`` is written relative to the JSONL file's folder. Returns the number of rows.
    """
    path = Path(path)
    idir = Path(images_dir) if images_dir is not None else None
    rows = []
    for s in samples:
        row: dict[str, Any] = {"id": s.id, "image_path": _image_ref(s, path, idir)}
        if s.question is not None:
            row["question"] = s.question
        row["answer"] = s.answer
        row.update(s.extra)
        rows.append(row)
    return atomic_write_jsonl(path, rows)


def write_index_records(
    records: Iterable[IndexRecord],
    path: PathLike,
    *,
    images_dir: PathLike | None = None,
) -> int:
    """Write index records as JSONL (atomically); see :func:`write_samples`."""
    path = Path(path)
    idir = Path(images_dir) if images_dir is not None else None
    rows = []
    for r in records:
        row: dict[str, Any] = {"id": r.id, "image_path": _image_ref(r, path, idir), "text": r.text}
        row.update(r.extra)
        rows.append(row)
    return atomic_write_jsonl(path, rows)


def pixels_digest(image: np.ndarray) -> str:
    """sha256 of an in-memory image: its dtype, shape and bytes (as :func:`records_digest` hashes it)."""
    from ..identity import bytes_digest

    a = np.ascontiguousarray(image)
    return bytes_digest(f"{a.dtype}{a.shape}".encode() + a.tobytes())


def image_identity(record: Sample | IndexRecord) -> dict:
    """What identifies a record's image: ``{"image_sha256": ...}`` (its file's bytes) when it has an
    image file, else ``{"pixels_sha256": ...}`` (its in-memory pixels). A record whose file is gone
    and that holds no pixels is a :class:`DataError` naming the file."""
    from ..identity import file_digest

    if record.image_path is not None:
        if Path(record.image_path).is_file():
            return {"image_sha256": file_digest(record.image_path)}
        if record.image is None:
            raise DataError(record.image_path, "image file not found", record=record.id)
    if record.image is not None:
        return {"pixels_sha256": pixels_digest(record.image)}
    raise ValueError(f"record {record.id!r} has neither an image nor an image_path")


def records_digest(records: Iterable[Sample | IndexRecord]) -> str:
    """The content identity of a sequence of samples or index records, in order: every field that
    can change a result (id, answer, label, question or caption text, the image's bytes), not the
    paths they were read from, and not ``extra``. Image files are hashed once per process."""
    from ..identity import bytes_digest, file_digest, json_digest

    parts = []
    for r in records:
        if r.image is not None:
            a = np.ascontiguousarray(r.image)
            image = bytes_digest(f"{a.dtype}{a.shape}".encode() + a.tobytes())
        elif r.image_path is not None:
            image = file_digest(r.image_path)
        else:
            image = None
        if isinstance(r, Sample):
            label = sorted(r.label) if isinstance(r.label, (set, frozenset)) else r.label
            parts.append(["sample", r.id, r.answer, label, r.question, image])
        else:
            parts.append(["index_record", r.id, r.text, image])
    return json_digest(parts)
