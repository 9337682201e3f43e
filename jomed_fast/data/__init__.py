"""Data: samples and index records, their loaders and the synthetic generator.

* :mod:`~jomed_fast.data.records` — the JSONL formats (samples ``{image_path, question?,
  answer|answers}``, index records ``{id, image_path, text}``), :func:`load_samples`,
  :func:`load_index_records`, writers.
* :mod:`~jomed_fast.data.medmnist` — MedMNIST ``.npz`` files.
* :mod:`~jomed_fast.data.vqa` — VQA-RAD, SLAKE (English), PathVQA JSON releases -> samples / JSONL.
* :mod:`~jomed_fast.data.synthetic` — the seeded synthetic task + index (demo, tests, benchmarks).
* :class:`DataError` — bad data, naming the file and the line / record.
"""

from .errors import DataError
from .io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_jsonl,
    encode_png,
    load_image,
    save_png,
)
from .medmnist import MedMNISTSplit, load_medmnist, load_medmnist_all, medmnist_to_jsonl
from .records import (
    IndexRecord,
    Loaded,
    Sample,
    load_index_records,
    load_samples,
    records_digest,
    write_index_records,
    write_samples,
)
from .vqa import (
    is_closed_answer,
    load_pathvqa,
    load_slake,
    load_vqa,
    load_vqa_rad,
    vqa_to_jsonl,
)

__all__ = [
    "DataError",
    "IndexRecord",
    "Loaded",
    "MedMNISTSplit",
    "Sample",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_jsonl",
    "encode_png",
    "is_closed_answer",
    "load_image",
    "load_index_records",
    "load_medmnist",
    "load_medmnist_all",
    "load_pathvqa",
    "load_samples",
    "load_slake",
    "load_vqa",
    "load_vqa_rad",
    "medmnist_to_jsonl",
    "records_digest",
    "save_png",
    "vqa_to_jsonl",
    "write_index_records",
    "write_samples",
]
