"""Medical VQA datasets: VQA-RAD, SLAKE (English) and PathVQA, read from their JSON releases.

Every loader returns a :class:`~jomed_fast.data.records.Loaded` list of
:class:`~jomed_fast.data.records.Sample` (``image_path`` absolute, ``question`` the sample's own,
``image`` decoded only with ``load_images=True``). :func:`vqa_to_jsonl` writes them in the
reference's sample JSONL format (``{id, image_path, question, answer}`` per line) so that
``jomed-fast predict --samples ...`` / ``train-*`` run on them unchanged.

Closed vs open (the reference's ``src/tasks/vqa_rad.py`` convention): a question is **closed** when
its answer is ``yes`` or ``no`` (case, whitespace and end punctuation ignored; the dataset's own
``answer_type`` is not used — VQA-RAD marks "left or right?" questions CLOSED too, and they are not
yes/no). Closed samples belong to the ``<dataset>_closed`` task: ``answer`` is the canonical
``"no"``/``"yes"`` and ``label`` its class index (0 = no, 1 = yes). Every other question is
**open**: the ``<dataset>_open`` task, ``answer`` the answer text as written (stripped),
``label`` ``None``. ``kind`` selects ``"closed"``, ``"open"`` or ``"all"`` (both, in file order).

Formats
-------
**VQA-RAD** (OSF release): ``<root>/VQA_RAD Dataset Public.json`` — a JSON list of objects with
``image_name`` (a file in the image folder), ``question``, ``answer`` (string or number),
``answer_type`` (``"CLOSED"``/``"OPEN"``), ``phrase_type`` and optional ``qid`` — and the image
folder ``<root>/VQA_RAD Image Folder/`` (also found as ``images/`` or ``<root>`` itself; or pass
``image_dir``). ``root`` may also be the JSON file itself. **Split** (the common convention; the
release has no split file): records whose ``phrase_type`` starts with ``"test"`` (``test_freeform``,
``test_para``) are ``"test"``, all others (``freeform``, ``para``, ...) ``"train"``. Ids:
``"vqa_rad-<i>"``, ``i`` the record's position in the JSON list (stable for a given file).

**SLAKE**: ``<root>/{train,validate,test}.json`` — JSON lists of objects with ``img_name`` (a path
under ``<root>/imgs/``, e.g. ``"xmlab102/source.jpg"``), ``question``, ``answer``,
``answer_type``, ``q_lang`` (``"en"``/``"zh"``) and ``qid``. Only English questions
(``q_lang == "en"``) are kept; the Chinese ones are dropped silently (they are not bad data).
Splits: ``"train"``, ``"validate"`` (alias ``"val"``), ``"test"``. Ids: ``"slake-<qid>"`` (or
``"slake-<split>-<i>"`` when a record has no ``qid``).

**PathVQA** (JSON only). Per split, the first of these files that exists:

* ``<root>/<split>.json`` or ``<root>/<split>_qa.json``;
* ``<root>/<split>/<split>.json``, ``<root>/<split>/<split>_qa.json`` or ``<root>/<split>/qa.json``
  (split folders);
* one file for all splits — ``<root>/qa.json`` or ``<root>/pathvqa.json`` (or ``root`` itself
  when it is a ``.json`` file) — whose records carry a ``split`` field (``train``/``val``/``test``;
  ``validate``/``valid``/``validation`` mean ``val``). A file given as ``root`` without ``split``
  fields is taken as the requested split whole.

Each file is a JSON list of ``{image, question, answer}`` objects (``id``/``qid`` optional).
``image`` is a file name or relative path; a name without an extension (the official release's
``"train_0422"``) is looked up as ``.jpg``, ``.jpeg`` and ``.png``. Images are searched in
``image_dir`` when given, else, relative to the JSON file's folder ``F``: ``F/images/<split>/``,
``F/images/``, ``F/<split>/``, ``F/``, and, for split folders, ``<root>/images/<split>/``.
Splits: ``"train"``, ``"val"`` (alias ``"validate"``), ``"test"``. Ids: the record's ``id``/``qid``
as ``"pathvqa-<id>"``, else ``"pathvqa-<split>-<i>"`` (position in the file).

The official PathVQA release ships Python pickles (``qas/<split>/<split>_qa.pkl``). They are never
read here (unpickling runs arbitrary code; the project reads JSON only): a ``.pkl`` where a JSON
file was expected raises a :class:`DataError`. Convert them once, on pickles you trust::

    python - <<'EOF'
    import json, pickle
    for s in ("train", "val", "test"):
        with open(f"pvqa/qas/{s}/{s}_qa.pkl", "rb") as f:
            rows = pickle.load(f)  # a list of {"image", "question", "answer", ...}
        with open(f"pvqa/{s}_qa.json", "w") as f:
            json.dump([{"image": r["image"], "question": r["question"], "answer": str(r["answer"])}
                       for r in rows], f)
    EOF

and load with ``root="pvqa"`` (images then resolve as ``pvqa/images/<split>/<image>.jpg``).

Bad data raises :class:`~jomed_fast.data.errors.DataError` naming the file and the record: a
missing or unreadable image, a record that is not an object, a missing, mistyped or empty field
(``question``, ``answer``, the image field, SLAKE's ``q_lang``, VQA-RAD's ``phrase_type``), a
duplicate id. With ``skip_bad=True`` those records are skipped and listed in ``result.skipped``
(``n_skipped``). These always raise, ``skip_bad`` or not: a missing JSON file, a malformed JSON
file (the message gives the line and column), a file that is not a JSON list, a ``.pkl`` file, and
an empty split (no usable record of the requested split and kind).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .._checks import is_int, is_number, positive_int
from ..tasks import get_task, normalize
from .errors import DataError
from .io import PathLike, check_image, load_image
from .records import VERIFY_MODES, Loaded, Sample, log_skipped, write_samples

logger = logging.getLogger(__name__)

DATASETS = ("vqa_rad", "slake", "pathvqa")
KINDS = ("closed", "open", "all")
VQA_RAD_JSON = "VQA_RAD Dataset Public.json"
VQA_RAD_IMAGE_DIRS = ("VQA_RAD Image Folder", "VQA_RAD_Image_Folder", "images", ".")
VQA_RAD_SPLITS = ("train", "test")
SLAKE_SPLITS = ("train", "validate", "test")
PATHVQA_SPLITS = ("train", "val", "test")
_YES_NO = ("no", "yes")  # the *_closed tasks' labels, in class order
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_SPLIT_ALIASES = {"validate": "val", "valid": "val", "validation": "val", "dev": "val"}


def is_closed_answer(answer: Any) -> bool:
    """True when ``answer`` is ``yes`` or ``no`` (case, whitespace and end punctuation ignored)."""
    return isinstance(answer, str) and normalize(answer) in _YES_NO


# ----------------------------------------------------------------------------------------------
# shared machinery
# ----------------------------------------------------------------------------------------------
def _refuse_pickle(path: Path) -> None:
    raise DataError(
        path,
        "pickle files are not read (unpickling can run arbitrary code; the project reads JSON only): "
        "convert it to a JSON list of {image, question, answer} objects first (see the "
        "jomed_fast.data.vqa docstring for a 6-line converter)",
    )


def _read_json_list(path: Path) -> list:
    """The JSON list in ``path``; a DataError for a missing, undecodable or non-list file."""
    if path.suffix.lower() in (".pkl", ".pickle"):
        _refuse_pickle(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(path, f"not UTF-8 text ({e})") from None
    except OSError as e:
        raise DataError(path, f"cannot open: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            path, f"malformed JSON ({e.msg} at line {e.lineno} column {e.colno}, char {e.pos})", line=e.lineno
        ) from None
    if not isinstance(data, list):
        raise DataError(path, f"expected a JSON list of records, got a JSON {type(data).__name__}")
    return data


def _field(path: Path, row: dict, key: str, rid: str, *, numbers: bool = False) -> str:
    """A required, non-empty string field (numbers allowed for answers, as VQA-RAD stores some)."""
    v = row.get(key)
    if v is None:
        raise DataError(path, f"missing {key!r}", record=rid)
    if numbers and is_number(v):
        v = str(v)
    if not isinstance(v, str):
        raise DataError(path, f"{key!r} must be a string, got {type(v).__name__}", record=rid)
    v = v.strip()
    if not v:
        raise DataError(path, f"empty {key!r}", record=rid)
    return v


def _find_image(name: str, dirs: Sequence[Path]) -> Path:
    """The first existing ``dir/name`` (trying image suffixes when ``name`` has none), else the first candidate."""
    p = Path(name)
    if p.is_absolute():
        return p
    names = [name] if p.suffix else [name] + [name + s for s in _IMAGE_SUFFIXES]
    for d in dirs:
        for n in names:
            c = d / n
            if c.is_file():
                return Path(os.path.abspath(c))
    return Path(os.path.abspath(dirs[0] / name))


def _resolve_image(path: Path, rid: str, name: str, dirs: Sequence[Path], verify: str, load: bool):
    p = _find_image(name, dirs)
    image = None
    try:
        if load:
            if not p.is_file():
                raise FileNotFoundError(p)
            image = load_image(p)
        elif verify != "none":
            check_image(p, verify)
    except FileNotFoundError:
        where = ", ".join(str(d) for d in dirs)
        raise DataError(path, f"missing image {name!r} (looked in {where})", record=rid) from None
    except Exception as e:  # noqa: BLE001  (PIL.UnidentifiedImageError, truncated files, permissions)
        raise DataError(path, f"unreadable image {str(p)!r} ({type(e).__name__}: {e})", record=rid) from None
    return str(p), image


def _check_args(split: str, splits: Sequence[str], kind: str, verify_images: str, aliases: dict) -> str:
    if not isinstance(split, str):
        raise TypeError(f"split: expected a str, got {type(split).__name__}")
    split = aliases.get(split, split)
    if split not in splits:
        raise ValueError(f"split: expected one of {tuple(splits)}, got {split!r}")
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    if verify_images not in VERIFY_MODES:
        raise ValueError(f"verify_images: expected one of {VERIFY_MODES}, got {verify_images!r}")
    return split


# parse_row(index, row) -> (rid, image_name, question, answer, extra), or None to drop the row
# silently (another split / language). It raises DataError for bad rows.
ParseRow = Callable[[int, dict], tuple | None]


def _build(
    path: Path,
    rows: list,
    parse_row: ParseRow,
    *,
    dataset: str,
    split: str,
    kind: str,
    image_dirs: Sequence[Path],
    skip_bad: bool,
    verify_images: str,
    load_images: bool,
    id_of_index: Callable[[int], str],
) -> Loaded:
    closed_task = get_task(f"{dataset}_closed")
    out: list[Sample] = []
    skipped: list[DataError] = []
    seen: dict[str, int] = {}
    n_split = 0
    for i, row in enumerate(rows):
        try:
            if not isinstance(row, dict):
                raise DataError(path, f"expected a JSON object, got {type(row).__name__}", record=id_of_index(i))
            parsed = parse_row(i, row)
            if parsed is None:
                continue
            n_split += 1
            rid, image_name, question, answer, extra = parsed
            closed = is_closed_answer(answer)
            if (kind == "closed" and not closed) or (kind == "open" and closed):
                continue
            if rid in seen:
                raise DataError(path, f"duplicate id (first at record #{seen[rid]})", record=rid)
            seen[rid] = i
            resolved, image = _resolve_image(path, rid, image_name, image_dirs, verify_images, load_images)
            label = None
            if closed:
                label = closed_task.label_index(answer)
                answer = closed_task.format_answer(label)
            extra = {
                "dataset": dataset,
                "split": split,
                "kind": "closed" if closed else "open",
                "source_index": i,
                **extra,
            }
            out.append(
                Sample(
                    id=rid, image_path=resolved, answer=answer, label=label, question=question, image=image, extra=extra
                )
            )
        except DataError as e:
            if not skip_bad:
                raise
            skipped.append(e)
    log_skipped(path, skipped, f"{dataset} record(s)")
    if not out:
        what = "records" if kind == "all" else f"{kind} ({'yes/no' if kind == 'closed' else 'non-yes/no'}) questions"
        detail = f"{n_split} record(s) of the split, {len(skipped)} bad record(s) skipped"
        raise DataError(path, f"empty split: no {what} in split {split!r} ({detail})")
    return Loaded(out, path=str(path), skipped=skipped)


def _opt_str(row: dict, key: str) -> str | None:
    v = row.get(key)
    return None if v is None else str(v)


# ----------------------------------------------------------------------------------------------
# VQA-RAD
# ----------------------------------------------------------------------------------------------
def load_vqa_rad(
    root: PathLike,
    split: str = "train",
    kind: str = "closed",
    *,
    skip_bad: bool = False,
    verify_images: str = "open",
    load_images: bool = False,
    image_dir: PathLike | None = None,
) -> Loaded:
    """VQA-RAD samples of one split (``"train"``/``"test"`` by ``phrase_type``; see the module docstring).

    Args:
        root: the folder holding ``VQA_RAD Dataset Public.json`` (or that JSON file itself).
        split: ``"train"`` (``phrase_type`` not starting with ``"test"``) or ``"test"``.
        kind: ``"closed"`` (yes/no answers, task ``vqa_rad_closed``), ``"open"`` or ``"all"``.
        skip_bad: skip bad records (counted in ``result.skipped``) instead of raising.
        verify_images: ``"none"``, ``"exists"``, ``"open"`` (header; default) or ``"decode"``.
        load_images: decode every image into ``Sample.image``.
        image_dir: the image folder (default: ``VQA_RAD Image Folder``, ``images`` or the JSON's folder).
    """
    split = _check_args(split, VQA_RAD_SPLITS, kind, verify_images, {})
    root = Path(root)
    path = root if root.is_file() or root.suffix.lower() == ".json" else root / VQA_RAD_JSON
    rows = _read_json_list(path)
    base = path.parent
    dirs = [Path(image_dir)] if image_dir is not None else [base / d for d in VQA_RAD_IMAGE_DIRS]
    if image_dir is None:
        dirs = [d for d in dirs if d.is_dir()] or [base / VQA_RAD_IMAGE_DIRS[0]]
    width = max(5, len(str(len(rows))))

    def rid_of(i: int) -> str:
        return f"vqa_rad-{i:0{width}d}"

    def parse_row(i: int, row: dict):
        rid = rid_of(i)
        phrase = _field(path, row, "phrase_type", rid)
        if ("test" if phrase.casefold().startswith("test") else "train") != split:
            return None
        image = _field(path, row, "image_name", rid)
        question = _field(path, row, "question", rid)
        answer = _field(path, row, "answer", rid, numbers=True)
        extra = {"phrase_type": phrase, "answer_type": _opt_str(row, "answer_type"), "qid": row.get("qid")}
        return rid, image, question, answer, extra

    return _build(
        path,
        rows,
        parse_row,
        dataset="vqa_rad",
        split=split,
        kind=kind,
        image_dirs=dirs,
        skip_bad=skip_bad,
        verify_images=verify_images,
        load_images=load_images,
        id_of_index=rid_of,
    )


# ----------------------------------------------------------------------------------------------
# SLAKE
# ----------------------------------------------------------------------------------------------
def load_slake(
    root: PathLike,
    split: str = "train",
    kind: str = "closed",
    *,
    skip_bad: bool = False,
    verify_images: str = "open",
    load_images: bool = False,
    image_dir: PathLike | None = None,
) -> Loaded:
    """SLAKE English samples of one split (``<root>/<split>.json`` + ``<root>/imgs/``; see the module docstring).

    Args:
        root: the SLAKE folder (``train.json``, ``validate.json``, ``test.json``, ``imgs/``).
        split: ``"train"``, ``"validate"`` (or ``"val"``) or ``"test"``.
        kind: ``"closed"`` (yes/no answers, task ``slake_closed``), ``"open"`` or ``"all"``.
        skip_bad, verify_images, load_images: as :func:`load_vqa_rad`.
        image_dir: the image folder (default ``<root>/imgs``).
    """
    split = _check_args(split, SLAKE_SPLITS, kind, verify_images, {"val": "validate"})
    root = Path(root)
    path = root / f"{split}.json"
    if not path.exists() and (root / f"{split}.pkl").exists():
        _refuse_pickle(root / f"{split}.pkl")
    rows = _read_json_list(path)
    dirs = [Path(image_dir) if image_dir is not None else root / "imgs"]

    def parse_row(i: int, row: dict):
        qid = row.get("qid")
        rid = f"slake-{qid}" if qid is not None and not isinstance(qid, (dict, list)) else f"slake-{split}-{i}"
        lang = _field(path, row, "q_lang", rid)
        if lang.casefold() != "en":
            return None
        image = _field(path, row, "img_name", rid)
        question = _field(path, row, "question", rid)
        answer = _field(path, row, "answer", rid, numbers=True)
        extra = {"answer_type": _opt_str(row, "answer_type"), "qid": qid}
        return rid, image, question, answer, extra

    return _build(
        path,
        rows,
        parse_row,
        dataset="slake",
        split=split,
        kind=kind,
        image_dirs=dirs,
        skip_bad=skip_bad,
        verify_images=verify_images,
        load_images=load_images,
        id_of_index=lambda i: f"slake-{split}-{i}",
    )


# ----------------------------------------------------------------------------------------------
# PathVQA
# ----------------------------------------------------------------------------------------------
def _pathvqa_file(root: Path, split: str) -> tuple[Path, bool, list[Path]]:
    """(QA json, whether records must be filtered by their ``split`` field, image folders)."""
    if root.is_file() or root.suffix.lower() in (".json", ".pkl", ".pickle"):
        if root.suffix.lower() in (".pkl", ".pickle"):
            _refuse_pickle(root)
        return root, True, []
    per_split = [root / f"{split}.json", root / f"{split}_qa.json"]
    folder = [root / split / f"{split}.json", root / split / f"{split}_qa.json", root / split / "qa.json"]
    single = [root / "qa.json", root / "pathvqa.json"]
    for c in per_split + folder:
        if c.is_file():
            extra = [root / "images" / split] if c.parent != root else []
            return c, False, extra
    for c in single:
        if c.is_file():
            return c, True, []
    for c in per_split + folder:
        for suffix in (".pkl", ".pickle"):
            if c.with_suffix(suffix).is_file():
                _refuse_pickle(c.with_suffix(suffix))
    for c in (root / "qas" / split / f"{split}_qa.pkl", root / "qas" / split / f"{split}.pkl"):
        if c.is_file():
            _refuse_pickle(c)
    tried = ", ".join(str(c.relative_to(root)) for c in per_split + folder + single)
    raise DataError(root, f"no PathVQA QA file for split {split!r}: expected one of {tried}")


def load_pathvqa(
    root: PathLike,
    split: str = "train",
    kind: str = "closed",
    *,
    skip_bad: bool = False,
    verify_images: str = "open",
    load_images: bool = False,
    image_dir: PathLike | None = None,
) -> Loaded:
    """PathVQA samples of one split from JSON (never pickle; the layouts are in the module docstring).

    Args:
        root: the PathVQA folder, or one QA ``.json`` file.
        split: ``"train"``, ``"val"`` (or ``"validate"``) or ``"test"``.
        kind: ``"closed"`` (yes/no answers, task ``pathvqa_closed``), ``"open"`` or ``"all"``.
        skip_bad, verify_images, load_images: as :func:`load_vqa_rad`.
        image_dir: the image folder (default: searched, see the module docstring).
    """
    split = _check_args(split, PATHVQA_SPLITS, kind, verify_images, _SPLIT_ALIASES)
    root = Path(root)
    path, filter_split, extra_dirs = _pathvqa_file(root, split)
    rows = _read_json_list(path)
    f = path.parent
    if image_dir is not None:
        dirs = [Path(image_dir)]
    else:
        dirs = [f / "images" / split, f / "images", f / split, f, *extra_dirs]
        dirs = [d for d in dirs if d.is_dir()] or [f]
    # a single file given as root without split fields is the requested split whole
    use_field = filter_split and any(isinstance(r, dict) and "split" in r for r in rows)
    width = max(5, len(str(len(rows))))

    def rid_of(i: int) -> str:
        return f"pathvqa-{split}-{i:0{width}d}"

    def parse_row(i: int, row: dict):
        own = row.get("id", row.get("qid"))
        rid = f"pathvqa-{own}" if (isinstance(own, str) or is_int(own)) else rid_of(i)
        if use_field:
            s = _field(path, row, "split", rid).casefold()
            if _SPLIT_ALIASES.get(s, s) != split:
                return None
        image = _field(path, row, "image", rid)
        question = _field(path, row, "question", rid)
        answer = _field(path, row, "answer", rid, numbers=True)
        return rid, image, question, answer, {"answer_type": _opt_str(row, "answer_type")}

    return _build(
        path,
        rows,
        parse_row,
        dataset="pathvqa",
        split=split,
        kind=kind,
        image_dirs=dirs,
        skip_bad=skip_bad,
        verify_images=verify_images,
        load_images=load_images,
        id_of_index=rid_of,
    )


# ----------------------------------------------------------------------------------------------
# conversion to the sample JSONL
# ----------------------------------------------------------------------------------------------
LOADERS: dict[str, Callable[..., Loaded]] = {"vqa_rad": load_vqa_rad, "slake": load_slake, "pathvqa": load_pathvqa}
SPLITS: dict[str, tuple[str, ...]] = {"vqa_rad": VQA_RAD_SPLITS, "slake": SLAKE_SPLITS, "pathvqa": PATHVQA_SPLITS}


def load_vqa(dataset: str, root: PathLike, split: str = "train", kind: str = "closed", **kwargs: Any) -> Loaded:
    """``load_vqa_rad`` / ``load_slake`` / ``load_pathvqa`` by name (``dataset`` in :data:`DATASETS`)."""
    if dataset not in LOADERS:
        raise ValueError(f"dataset: expected one of {DATASETS}, got {dataset!r}")
    return LOADERS[dataset](root, split, kind, **kwargs)


def vqa_to_jsonl(
    dataset: str,
    root: PathLike,
    out_dir: PathLike,
    splits: Iterable[str] | None = None,
    kinds: Iterable[str] = ("closed", "open"),
    *,
    limit: int | None = None,
    skip_bad: bool = False,
    image_dir: PathLike | None = None,
) -> dict[str, Path]:
    """Convert a VQA dataset to sample JSONL files ``out_dir/<split>_<kind>.jsonl`` (atomic writes).

    Each line is ``{"id", "image_path", "question", "answer"}``; ``image_path`` points at the
    dataset's own image (relative to ``out_dir``; images are not copied). The closed files hold
    ``"yes"``/``"no"`` answers for the ``<dataset>_closed`` task, the open files the answer text
    for ``<dataset>_open``. Returns ``{"<split>_<kind>": path}``.

    Args:
        dataset: ``"vqa_rad"``, ``"slake"`` or ``"pathvqa"``.
        root: the dataset folder (as the loaders take it).
        out_dir: where the JSONL files go (created).
        splits: the splits to convert (default: all of the dataset's splits).
        kinds: any of ``"closed"``, ``"open"``, ``"all"``.
        limit: keep the first ``limit`` samples per file.
        skip_bad: skip (and log) bad records instead of raising.
        image_dir: passed to the loader.
    """
    if dataset not in LOADERS:
        raise ValueError(f"dataset: expected one of {DATASETS}, got {dataset!r}")
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)  # "open" is one kind, not 4 letters
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"kinds: expected values in {KINDS}, got {k!r}")
    splits = SPLITS[dataset] if splits is None else (splits,) if isinstance(splits, str) else tuple(splits)
    positive_int("limit", limit, optional=True)
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}
    for split in splits:
        loaded = load_vqa(dataset, root, split, "all", skip_bad=skip_bad, verify_images="open", image_dir=image_dir)
        split_name = loaded[0].extra["split"]  # canonical ("val" -> "validate" for SLAKE)
        for k in kinds:
            chosen = [s for s in loaded if k == "all" or s.extra["kind"] == k]
            if not chosen:
                raise DataError(loaded.path, f"empty split: no {k} questions in split {split_name!r}")
            if limit is not None:
                chosen = chosen[:limit]
            rows = [Sample(id=s.id, image_path=s.image_path, answer=s.answer, question=s.question) for s in chosen]
            target = out_dir / f"{split_name}_{k}.jsonl"
            write_samples(rows, target)
            written[f"{split_name}_{k}"] = target
    return written
