"""The synthetic data on disk: JSONL + PNG per split and for the index, and a manifest (config,
counts, sha256 of each JSONL file) written last, so that an interrupted write never looks whole."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ...tasks import get_task
from ..errors import DataError
from ..io import PathLike, atomic_write_json, sha256_file
from ..records import load_index_records, load_samples, write_index_records, write_samples
from .config import GENERATOR_VERSION, SPLITS, SyntheticConfig
from .dataset import SyntheticDataset

MANIFEST = "manifest.json"


def write_synthetic(dataset: SyntheticDataset, out_dir: PathLike) -> Path:
    """Write ``dataset`` as JSONL + PNG under ``out_dir`` (atomic files; manifest last)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = out / MANIFEST
    if stale.exists():
        stale.unlink()  # an interrupted rewrite must not look complete
    files = {}
    for split in SPLITS:
        p = out / f"{split}.jsonl"
        write_samples(dataset.split(split), p, images_dir=out / "images" / split)
        files[p.name] = sha256_file(p)
    p = out / "index.jsonl"
    write_index_records(dataset.index, p, images_dir=out / "images" / "index")
    files[p.name] = sha256_file(p)
    manifest = {
        "generator": "jomed_fast.data.synthetic",
        "version": GENERATOR_VERSION,
        "task": dataset.task.name,
        "config": dataset.config.to_dict(),
        "counts": {s: len(dataset.split(s)) for s in (*SPLITS, "index")},
        "files": files,
    }
    atomic_write_json(out / MANIFEST, manifest)
    return out


def load_synthetic(out_dir: PathLike, *, load_images: bool = True, verify: bool = True) -> SyntheticDataset:
    """Read a folder written by :func:`write_synthetic` (checks the manifest and checksums)."""
    out = Path(out_dir)
    mpath = out / MANIFEST
    if not mpath.exists():
        raise DataError(mpath, "missing manifest: not a complete synthetic dataset folder (interrupted write?)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        config = SyntheticConfig.from_dict(manifest["config"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(mpath, f"bad manifest ({type(e).__name__}: {e})") from None
    if verify:
        for name, digest in manifest.get("files", {}).items():
            p = out / name
            if not p.exists():
                raise DataError(p, "listed in the manifest but missing")
            if sha256_file(p) != digest:
                raise DataError(p, "checksum differs from the manifest (file changed or corrupt)")
    task = get_task(manifest.get("task", "synthetic"))
    mode = "decode" if load_images else "open"
    splits = {
        s: list(load_samples(out / f"{s}.jsonl", task, load_images=load_images, verify_images=mode)) for s in SPLITS
    }
    index = list(load_index_records(out / "index.jsonl", load_images=load_images, verify_images=mode))
    for name, recs in (*splits.items(), ("index", index)):
        want = manifest.get("counts", {}).get(name)
        if want is not None and want != len(recs):
            raise DataError(out / f"{name}.jsonl", f"has {len(recs)} records, the manifest says {want}")
    return SyntheticDataset(config=config, task=task, index=index, **splits)


def images_array(records: Sequence[Any]) -> np.ndarray:
    """``[n, H, W, 3]`` uint8 stack of the records' images (loading them when needed)."""
    return np.stack([r.load_image() for r in records])
