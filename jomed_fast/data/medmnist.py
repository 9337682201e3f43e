"""MedMNIST / MedMNIST+ ``.npz`` files (official splits).

Keys: ``{train,val,test}_images`` — uint8 ``[n, H, W]`` (grey) or ``[n, H, W, 3]`` (RGB), H = W
in {28, 64, 128, 224}; ``{train,val,test}_labels`` — ``[n]`` or ``[n, 1]`` class labels, or
``[n, L]`` 0/1 multi-label rows. Read with ``allow_pickle=False``.

Bad files raise :class:`~jomed_fast.data.errors.DataError` naming the file and the key (and the
record index for a bad label): unreadable file, missing key, wrong dtype/shape, mismatched image
and label counts, a label outside the task's label set.

A task's ``source_label_map`` turns dataset labels into class indices (BreastMNIST stores
0 = malignant, 1 = normal/benign; the Breast task answers "Yes" = cancer = class 1).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np

from .._checks import positive_int
from ..tasks import Task, get_task
from .errors import DataError
from .io import PathLike
from .records import Sample, write_samples

SPLITS = ("train", "val", "test")


@dataclass(eq=False)
class MedMNISTSplit:
    """One split of a MedMNIST file: ``images`` ``[n, H, W(, 3)]`` uint8 and raw ``labels``."""

    path: str
    split: str
    images: np.ndarray
    labels: np.ndarray  # [n] (single label) or [n, L] (multi-label), int64
    multilabel: bool
    task: Optional[Task] = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def is_rgb(self) -> bool:
        return self.images.ndim == 4

    def image_rgb(self, i: int) -> np.ndarray:
        im = self.images[i]
        return np.ascontiguousarray(np.repeat(im[:, :, None], 3, axis=2) if im.ndim == 2 else im)

    def class_label(self, i: int) -> Any:
        """The task's class index (or frozenset) of record ``i``; needs a task."""
        if self.task is None:
            raise ValueError("class_label needs the split to be loaded with a task")
        row = self.labels[i]
        try:
            return self.task.from_source_label(row if self.multilabel else int(row))
        except ValueError as e:
            key = f"{self.split}_labels"
            raise DataError(self.path, f"{key}[{i}]: {e}", record=i) from None

    def samples(self) -> Iterator[Sample]:
        """Samples with in-memory RGB images, ids ``"<stem>-<split>-<i>"``, canonical answers."""
        if self.task is None:
            raise ValueError("samples() needs the split to be loaded with a task")
        stem = Path(self.path).stem
        width = max(5, len(str(len(self))))
        for i in range(len(self)):
            label = self.class_label(i)
            yield Sample(
                id=f"{stem}-{self.split}-{i:0{width}d}",
                image_path=None,
                answer=self.task.format_answer(label),
                label=label,
                question=None,
                image=self.image_rgb(i),
                extra={"source_index": i},
            )


def _open_npz(path: Path):
    if not path.exists():
        raise DataError(path, "file not found")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(path, f"not a readable .npz file ({type(e).__name__}: {e})") from None


def load_medmnist(
    path: PathLike,
    split: str = "train",
    task: Union[Task, str, None] = None,
) -> MedMNISTSplit:
    """Read one split of a MedMNIST ``.npz``; with a task, every label is checked against it."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    if isinstance(task, str):
        task = get_task(task)
    path = Path(path)
    ik, lk = f"{split}_images", f"{split}_labels"
    with _open_npz(path) as z:
        keys = sorted(z.files)
        for k in (ik, lk):
            if k not in z.files:
                raise DataError(path, f"missing key {k!r} (keys present: {keys})")
        try:
            images, labels = z[ik], z[lk]
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
            raise DataError(path, f"cannot read {ik!r}/{lk!r} ({type(e).__name__}: {e})") from None
    if images.dtype != np.uint8:
        raise DataError(path, f"{ik!r}: expected uint8 pixels, got {images.dtype}")
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
        raise DataError(path, f"{ik!r}: expected [n, H, W] or [n, H, W, 3], got shape {images.shape}")
    if not np.issubdtype(labels.dtype, np.integer) and not np.issubdtype(labels.dtype, np.bool_):
        if (
            np.issubdtype(labels.dtype, np.floating)
            and np.all(np.isfinite(labels))
            and np.all(labels == np.round(labels))
        ):
            pass
        else:
            raise DataError(path, f"{lk!r}: expected integer labels, got {labels.dtype}")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim not in (1, 2):
        raise DataError(path, f"{lk!r}: expected [n], [n, 1] or [n, L], got shape {labels.shape}")
    if labels.shape[0] != images.shape[0]:
        raise DataError(
            path,
            f"mismatched counts: {ik!r} has {images.shape[0]} images but {lk!r} has {labels.shape[0]} labels",
        )
    labels = labels.astype(np.int64)
    multilabel = labels.ndim == 2
    out = MedMNISTSplit(str(path), split, images, labels, multilabel, task)
    if task is not None:
        if multilabel != task.is_multilabel:
            raise DataError(
                path,
                f"{lk!r} has shape {tuple(labels.shape)} ({'multi-label' if multilabel else 'single-label'}) "
                f"but task {task.name!r} is {task.kind}",
            )
        n_src = len(task.source_label_map) if task.source_label_map is not None else task.num_classes
        if multilabel:
            if labels.shape[1] != n_src:
                raise DataError(path, f"{lk!r} has {labels.shape[1]} label columns, task {task.name!r} has {n_src}")
            bad_rows = np.argwhere((labels != 0) & (labels != 1))[:, 0]
        else:
            bad_rows = np.flatnonzero((labels < 0) | (labels >= n_src))
        if len(bad_rows):
            i = int(bad_rows[0])
            raise DataError(
                path,
                f"{lk}[{i}] = {labels[i].tolist()} is outside the label set of task {task.name!r} "
                f"({'0/1 per column' if multilabel else f'0..{n_src - 1}'}; {len(bad_rows)} bad value(s))",
                record=i,
            )
    return out


def load_medmnist_all(path: PathLike, task: Union[Task, str, None] = None) -> dict[str, MedMNISTSplit]:
    """All three official splits."""
    return {s: load_medmnist(path, s, task) for s in SPLITS}


def medmnist_to_jsonl(
    path: PathLike,
    out_dir: PathLike,
    task: Union[Task, str],
    splits: tuple[str, ...] = SPLITS,
    limit: Optional[int] = None,
) -> dict[str, Path]:
    """Convert a MedMNIST file to the JSONL sample format: ``out_dir/<split>.jsonl`` + PNGs.

    Returns ``{split: jsonl path}``. ``limit`` keeps the first ``limit`` records per split (an int
    >= 1; ``None`` keeps all). A negative limit would slice off records from the end, and 0 would
    write empty files, so both are refused.
    """
    positive_int("limit", limit, optional=True)
    task = get_task(task) if isinstance(task, str) else task
    splits = (splits,) if isinstance(splits, str) else tuple(splits)  # "test" is one split, not 4 letters
    out_dir = Path(out_dir)
    written = {}
    for split in splits:
        data = load_medmnist(path, split, task)
        samples = list(data.samples())
        if limit is not None:
            samples = samples[:limit]
        target = out_dir / f"{split}.jsonl"
        write_samples(samples, target, images_dir=out_dir / "images" / split)
        written[split] = target
    return written
