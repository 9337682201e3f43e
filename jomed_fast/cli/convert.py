"""``convert``: a public dataset's release to the sample JSONL format the other subcommands read.

``--format medmnist``: a MedMNIST ``.npz`` to ``OUT/<split>.jsonl`` and PNGs under ``OUT/images``
(:func:`jomed_fast.data.medmnist_to_jsonl`; ``--task`` names the task the labels belong to).
``--format image_folder``: a folder of class subfolders (``SRC/<label>/*.png``) to ``OUT/all.jsonl``
pointing at the files themselves (:func:`jomed_fast.data.image_folder.image_folder_samples`).
``--format vqa_rad | slake | pathvqa``: the dataset's JSON release to ``OUT/<split>_<kind>.jsonl``
pointing at the release's own images (:func:`jomed_fast.data.vqa_to_jsonl`). An option that does
not apply to the format is an error, not ignored.

For the labelled formats (medmnist, image_folder), ``--index-fraction F`` moves a seeded
(``--seed``), per-class share F of the ``--index-from`` split's samples into
``OUT/index_records.jsonl`` with report-style captions (``--caption-template``), the rest staying in
that split's file (:func:`jomed_fast.data.index_split.split_index_records`): an index that shares
no sample with the queries.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

from .._checks import check_int
from ..data import medmnist, vqa
from ..data.index_split import DEFAULT_CAPTION
from .options import Command, Opt

LABELLED = ("medmnist", "image_folder")
FORMATS = (*LABELLED, *vqa.DATASETS)
SPLITS = {"medmnist": medmnist.SPLITS, "image_folder": ("all",), **vqa.SPLITS}
VQA_KINDS = inspect.signature(vqa.vqa_to_jsonl).parameters["kinds"].default
# options that only one family of formats takes, and their values when not given
LABELLED_ONLY = {
    "task": None,
    "task_file": None,
    "index_fraction": None,
    "index_from": None,
    "caption_template": None,
    "seed": None,
}
VQA_ONLY = {"kinds": None, "skip_bad": False, "image_dir": None}

CONVERT_OPTS = (
    Opt("format", str, None, "the dataset's release", choices=FORMATS, required=True),
    Opt(
        "src",
        str,
        None,
        "the release: a MedMNIST .npz file, a folder of class subfolders, or the VQA dataset's folder (or its JSON file)",
        required=True,
    ),
    Opt("out", str, None, "folder for the JSONL files (created)", required=True),
    Opt(
        "task",
        str,
        None,
        "the task whose labels the MedMNIST file or the image folder holds (breast, derma, retina, ...; "
        "--format medmnist / image_folder only, and required there, or --task-file)",
    ),
    Opt("task_file", str, None, "the task as a YAML file of Task fields, in place of --task"),
    Opt(
        "index_fraction",
        float,
        None,
        "move this share of each class of the --index-from split into OUT/index_records.jsonl",
        default_doc="none",
    ),
    Opt("index_from", str, None, "the split the index records come from", default_doc="train; image_folder: all"),
    Opt(
        "caption_template",
        str,
        None,
        "the index records' caption; {label} is the class's name",
        default_doc=repr(DEFAULT_CAPTION),
    ),
    Opt("seed", int, None, "seed of the index records' draw", default_doc="0"),
    Opt(
        "splits",
        list,
        None,
        "splits to convert (" + "; ".join(f"{f}: {' '.join(s)}" for f, s in SPLITS.items()) + ")",
        default_doc="all of the format's",
    ),
    Opt(
        "kinds",
        list,
        None,
        f"VQA: the question kinds, one file each, among {', '.join(vqa.KINDS)}",
        choices=vqa.KINDS,
        default_doc=" ".join(VQA_KINDS),
    ),
    Opt("limit", int, None, "keep the first N samples of each file", default_doc="all"),
    Opt("skip_bad", bool, False, "VQA: skip and count bad records instead of stopping"),
    Opt("image_dir", str, None, "VQA: the images' folder", default_doc="found beside the JSON files"),
)


def check_convert_options(v: dict) -> None:
    """Refuse the options the format does not take, an unknown split and a limit below 1."""
    others = VQA_ONLY if v["format"] in LABELLED else LABELLED_ONLY
    for name, unset in others.items():
        if v[name] != unset:
            takes = ", ".join(vqa.DATASETS) if name in VQA_ONLY else ", ".join(LABELLED)
            raise ValueError(f"--{name.replace('_', '-')}: only --format {takes} takes it, got --format {v['format']}")
    if v["format"] in LABELLED and v["task"] is None and v["task_file"] is None:
        raise ValueError(
            f"--task: required with --format {v['format']} (the task whose labels the data holds, e.g. breast), "
            "or --task-file"
        )
    if v["format"] in LABELLED and v["index_fraction"] is None:
        for name in ("index_from", "caption_template", "seed"):
            if v[name] is not None:
                raise ValueError(f"--{name.replace('_', '-')}: goes with --index-fraction")
    known = SPLITS[v["format"]]
    for split in v["splits"] or ():
        if split not in known:
            raise ValueError(
                f"--splits: expected values among {', '.join(known)} for --format {v['format']}, got {split!r}"
            )
    if v["limit"] is not None:
        check_int("--limit", v["limit"], 1)


def run_convert(v: dict) -> int:
    check_convert_options(v)
    splits = tuple(v["splits"] or SPLITS[v["format"]])
    index_from = v["index_from"] or ("all" if v["format"] == "image_folder" else "train")
    if v["format"] in LABELLED:
        from .common import task_from

        task = task_from(v, default=None)
        if v["index_fraction"] is not None:
            if index_from not in splits:
                raise ValueError(
                    f"--index-from: expected one of the splits converted ({', '.join(splits)}), got {index_from!r}"
                )
            _check_index_split(v)
    if v["format"] == "medmnist":
        written = medmnist.medmnist_to_jsonl(v["src"], v["out"], task, splits, limit=v["limit"])
    elif v["format"] == "image_folder":
        written = {"all": _image_folder(v["src"], Path(v["out"]), task, v["limit"])}
    else:
        written = vqa.vqa_to_jsonl(
            v["format"],
            v["src"],
            v["out"],
            splits,
            tuple(v["kinds"] or VQA_KINDS),
            limit=v["limit"],
            skip_bad=v["skip_bad"],
            image_dir=v["image_dir"],
        )
    if v["format"] in LABELLED and v["index_fraction"] is not None:
        written["index_records"] = _move_to_index(written[index_from], Path(v["out"]), task, v)
    print(json.dumps({name: {"path": str(path), "samples": _count_lines(path)} for name, path in written.items()}))
    return 0


def _check_index_split(v: dict) -> None:
    from ..data.index_split import check_caption_template

    if not 0.0 < v["index_fraction"] < 1.0:
        raise ValueError(f"--index-fraction: expected a share in (0, 1), got {v['index_fraction']}")
    check_caption_template(v["caption_template"] or DEFAULT_CAPTION)


def _image_folder(src, out: Path, task, limit: int | None) -> Path:
    from ..data import write_samples
    from ..data.image_folder import image_folder_samples

    samples = image_folder_samples(src, task)
    target = out / "all.jsonl"
    write_samples(samples[:limit] if limit is not None else samples, target)
    return target


def _move_to_index(split_file: Path, out: Path, task, v: dict) -> Path:
    """The split's samples, split into index records (``OUT/index_records.jsonl``) and the rest
    (rewritten in place)."""
    from ..data import load_samples, write_index_records, write_samples
    from ..data.index_split import split_index_records

    # loaded paths are the working directory's; written, they become relative to the JSONL again
    samples = [
        dataclasses.replace(s, image_path=str(Path(s.image_path).absolute()) if s.image_path else None)
        for s in load_samples(split_file, task, verify_images="none")
    ]
    seed = v["seed"] if v["seed"] is not None else 0
    kept, records = split_index_records(
        samples, task, v["index_fraction"], seed, v["caption_template"] or DEFAULT_CAPTION
    )
    target = out / "index_records.jsonl"
    write_index_records(records, target)
    write_samples(kept, split_file)
    return target


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


COMMANDS = (
    Command(
        "convert",
        "a public dataset's release to sample JSONL (MedMNIST, VQA-RAD, SLAKE, PathVQA)",
        "medmnist: a MedMNIST .npz to OUT/<split>.jsonl and PNGs under OUT/images (--task names the "
        "task of its labels). vqa_rad, slake, pathvqa: the JSON release to OUT/<split>_<kind>.jsonl "
        "pointing at the release's own images. An option the format does not take is an error, not ignored.",
        CONVERT_OPTS,
        run_convert,
    ),
)
