"""``convert``: a public dataset's release to the sample JSONL format the other subcommands read.

``--format medmnist``: a MedMNIST ``.npz`` to ``OUT/<split>.jsonl`` and PNGs under ``OUT/images``
(:func:`jomed_fast.data.medmnist_to_jsonl`; ``--task`` names the task the labels belong to).
``--format vqa_rad | slake | pathvqa``: the dataset's JSON release to ``OUT/<split>_<kind>.jsonl``
pointing at the release's own images (:func:`jomed_fast.data.vqa_to_jsonl`). An option that does
not apply to the format is an error, not ignored.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from .._checks import check_int
from ..data import medmnist, vqa
from .options import Command, Opt

FORMATS = ("medmnist", *vqa.DATASETS)
SPLITS = {"medmnist": medmnist.SPLITS, **vqa.SPLITS}
VQA_KINDS = inspect.signature(vqa.vqa_to_jsonl).parameters["kinds"].default
# options that only one family of formats takes, and their values when not given
MEDMNIST_ONLY = {"task": None}
VQA_ONLY = {"kinds": None, "skip_bad": False, "image_dir": None}

CONVERT_OPTS = (
    Opt("format", str, None, "the dataset's release", choices=FORMATS, required=True),
    Opt(
        "src",
        str,
        None,
        "the release: a MedMNIST .npz file, or the VQA dataset's folder (or its JSON file)",
        required=True,
    ),
    Opt("out", str, None, "folder for the JSONL files (created)", required=True),
    Opt(
        "task",
        str,
        None,
        "the task whose labels the MedMNIST file holds (breast, derma, retina, ...; "
        "--format medmnist only, and required there)",
    ),
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
    others = VQA_ONLY if v["format"] == "medmnist" else MEDMNIST_ONLY
    for name, unset in others.items():
        if v[name] != unset:
            takes = ", ".join(vqa.DATASETS) if name in VQA_ONLY else "medmnist"
            raise ValueError(f"--{name.replace('_', '-')}: only --format {takes} takes it, got --format {v['format']}")
    if v["format"] == "medmnist" and v["task"] is None:
        raise ValueError("--task: required with --format medmnist (the task whose labels the file holds, e.g. breast)")
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
    if v["format"] == "medmnist":
        written = medmnist.medmnist_to_jsonl(v["src"], v["out"], v["task"], splits, limit=v["limit"])
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
    print(json.dumps({name: {"path": str(path), "samples": _count_lines(path)} for name, path in written.items()}))
    return 0


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
