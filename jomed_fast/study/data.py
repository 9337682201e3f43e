"""One study dataset on disk: a MedMNIST file's official splits as sample JSONL and PNGs, the
training split divided into index records and training queries (``data.index_split``).

``prepare_dataset`` writes ``out_dir/{train,val,test}.jsonl``, ``index_records.jsonl``, the images
and ``manifest.json`` (the source file's sha256 and the counts) once; a rerun reads them back. A
folder whose manifest names another source file, share, template or limit is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from ..data import load_index_records, load_samples, write_index_records, write_samples
from ..data.index_split import split_index_records
from ..data.io import atomic_write_json
from ..data.medmnist import load_medmnist
from ..data.records import IndexRecord, Sample
from ..tasks import Task, get_task

__all__ = ["StudyData", "file_sha256", "prepare_dataset"]


@dataclasses.dataclass(frozen=True)
class StudyData:
    """The task, its queries by split (images loaded) and the index records (images loaded)."""

    task: Task
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    index: list[IndexRecord]

    @property
    def image_size(self) -> int:
        return int(self.test[0].load_image().shape[0])


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write(src: Path, out: Path, task: Task, fraction: float, seed: int, template: str, limit: int | None) -> dict:
    counts = {}
    for split in ("train", "val", "test"):
        samples = list(load_medmnist(src, split, task).samples())[:limit]
        if split == "train":
            samples, records = split_index_records(samples, task, fraction, seed, template)
            write_index_records(records, out / "index_records.jsonl", images_dir=out / "images" / "index")
            counts["index"] = len(records)
        write_samples(samples, out / f"{split}.jsonl", images_dir=out / "images" / split)
        counts[split] = len(samples)
    return counts


def prepare_dataset(
    src, out_dir, task: Task | str, *, fraction: float, seed: int, template: str, limit: int | None = None
) -> StudyData:
    """The dataset of the module docstring, written to ``out_dir`` unless it is there already."""
    src, out = Path(src), Path(out_dir)
    task = get_task(task) if isinstance(task, str) else task
    if not src.is_file():
        raise FileNotFoundError(f"--data-dir: {src} not found (a MedMNIST .npz; see the README's data section)")
    key = {
        "source": src.name,
        "sha256": file_sha256(src),
        "task": task.name,
        "index_fraction": fraction,
        "seed": seed,
        "caption_template": template,
        "limit": limit,
    }
    manifest = out / "manifest.json"
    if manifest.exists():
        old = json.loads(manifest.read_text())
        changed = sorted(k for k in key if old.get(k) != key[k])
        if changed:
            raise ValueError(
                f"out_dir: {out} holds a dataset made with other inputs ({changed}); use another directory"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        counts = _write(src, out, task, fraction, seed, template, limit)
        atomic_write_json(manifest, {**key, "counts": counts})
    splits = {s: list(load_samples(out / f"{s}.jsonl", task, load_images=True)) for s in ("train", "val", "test")}
    index = list(load_index_records(out / "index_records.jsonl", load_images=True))
    return StudyData(task, splits["train"], splits["val"], splits["test"], index)
