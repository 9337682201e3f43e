"""User-defined tasks from YAML (``--task-file``) and the labelled conversions: a task file
written from a built-in task's fields loads back as that task (same identity), every malformed
file is one named error, an image folder converts to samples of its classes, and the index split
is stratified, seeded and disjoint from the samples it leaves."""

import collections
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from _faults import run
from PIL import Image

from jomed_fast.analysis import index_labels
from jomed_fast.data import Sample, load_index_records, load_samples
from jomed_fast.data.image_folder import image_folder_samples
from jomed_fast.data.index_split import split_index_records
from jomed_fast.tasks import Task, get_task, load_task_file, paper_legend


def _fields_of(task: Task) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(task).items()}


def _write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


@pytest.mark.parametrize("name", ["breast", "derma_reference", "vindr_pcxr", "vqa_rad_open"])
def test_a_task_file_of_a_built_in_tasks_fields_is_that_task(name, tmp_path):
    task = get_task(name)
    got = load_task_file(_write(tmp_path / "task.yaml", _fields_of(task)))
    assert got == task and got.identity == task.identity


def test_the_paper_legend_is_built_from_the_label_names(tmp_path):
    fields = {"name": "lesions", "kind": "multiclass", "labels": ["0", "1", "2"], "question": "Which lesion?"}
    fields["label_names"] = ["nevus", "melanoma", "keratosis"]
    got = load_task_file(_write(tmp_path / "t.yaml", {**fields, "legend": "paper"}))
    assert got.instructions == paper_legend(("nevus", "melanoma", "keratosis"))
    assert got.instructions.startswith("Provide answer according to the labels:")
    assert got == Task(**{**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}, "instructions": got.instructions})  # fmt: skip


BASE = {"name": "mine", "kind": "binary", "labels": ["No", "Yes"], "question": "Is it there?"}


@pytest.mark.parametrize(
    "data, message",
    [
        ({**BASE, "colour": "red"}, "unknown field 'colour'"),
        ({k: v for k, v in BASE.items() if k != "labels"}, "missing field 'labels'"),
        ({k: v for k, v in BASE.items() if k != "question"}, "missing field 'question'"),
        ({**BASE, "labels": ["Yes", "yes"]}, "are the same answer after normalisation"),
        ({**BASE, "labels": "No, Yes"}, "labels: expected a list of str, got 'No, Yes'"),
        ({**BASE, "labels": ["No", 1]}, "labels: expected a list of str"),
        ({**BASE, "question": 3}, "question: expected a str or null, got 3"),
        ({**BASE, "kind": "ranking"}, "kind must be one of"),
        ({**BASE, "legend": "paper"}, "legend: needs label_names"),
        ({**BASE, "legend": "mine", "label_names": ["a", "b"]}, "legend: expected one of ('paper',), got 'mine'"),
        (
            {**BASE, "legend": "paper", "label_names": ["a", "b"], "instructions": "x"},
            "legend and instructions: give one",
        ),
        (["name", "kind"], "expected a mapping of Task fields, got list"),
        ("name: [unclosed", "not valid YAML"),
    ],
)
def test_a_bad_task_file_is_one_named_error(data, message, tmp_path):
    path = _write(tmp_path / "task.yaml", data)
    with pytest.raises(ValueError) as err:
        load_task_file(path)
    assert str(err.value).startswith(f"--task-file {path}: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_the_cli_takes_a_task_file_and_refuses_it_beside_task_or_prompts(tmp_path, capsys):
    bad = _write(tmp_path / "bad.yaml", {**BASE, "colour": "red"})
    code, _out, err = run(["predict", "--reader", tmp_path, "--samples", "s.jsonl", "--out", tmp_path / "p",
                           "--task-file", bad, "--retrieval", "none"], capsys)  # fmt: skip
    assert code == 2 and err == f"jomed-fast predict: error: --task-file {bad}: unknown field 'colour' (fields: " + (
        ", ".join(sorted({f.name for f in dataclasses.fields(Task)} | {"legend"})) + ")\n"
    )
    good = _write(tmp_path / "good.yaml", BASE)
    for extra, message in ((["--task", "breast"], "give --task or --task-file, not both"),
                           (["--prompts", "reference"], "--prompts: chooses a built-in task's prompts")):  # fmt: skip
        code, _out, err = run(["predict", "--reader", tmp_path, "--samples", "s.jsonl", "--out", tmp_path / "p",
                               "--task-file", good, "--retrieval", "none", *extra], capsys)  # fmt: skip
        assert code == 2 and message in err and err.count("\n") == 1


# ------------------------------------------------------------------------------ image folders
COUNTS = {"No": 7, "Signs of cancer": 5}  # one folder by label, one by label name


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for name, n in COUNTS.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / name / f"im{i:02d}.png")
        (root / name / "notes.txt").write_text("not an image")
    return root


def test_an_image_folder_is_samples_of_its_classes(folder):
    samples = image_folder_samples(folder, get_task("breast"))
    assert [s.id for s in samples] == [f"No/im{i:02d}" for i in range(7)] + [
        f"Signs of cancer/im{i:02d}" for i in range(5)
    ]
    assert [s.label for s in samples] == [0] * 7 + [1] * 5 and {s.answer for s in samples} == {"No", "Yes"}
    (folder / "benign").mkdir()
    with pytest.raises(ValueError, match=r"subfolder 'benign' of .* is not a class of task 'breast' \(labels 'No', 'Yes'; or their names"):  # fmt: skip
        image_folder_samples(folder, get_task("breast"))


def _brute_force_take(labels, fraction):
    return {c: int(round(fraction * n)) for c, n in collections.Counter(labels).items()}


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.8])
def test_the_index_split_is_stratified_seeded_and_disjoint(fraction):
    task = get_task("derma")
    rng = np.random.default_rng(5)
    labels = rng.choice(task.num_classes, size=137, p=[0.4, 0.2, 0.15, 0.1, 0.08, 0.05, 0.02])
    samples = [Sample(id=f"s{i}", image_path=f"/x/{i}.png", answer=task.format_answer(int(c)), label=int(c)) for i, c in enumerate(labels)]  # fmt: skip
    kept, records = split_index_records(samples, task, fraction, seed=3, template="Report: {label}.")
    taken = collections.Counter(samples[int(r.id[len("index/s") :])].label for r in records)
    want = _brute_force_take(labels.tolist(), fraction)
    assert {c: taken.get(c, 0) for c in want} == want
    for c, n in collections.Counter(labels.tolist()).items():  # within one record of the share per class
        assert abs(taken.get(c, 0) - fraction * n) <= 1
    ids = {r.id[len("index/") :] for r in records}
    assert not ids & {s.id for s in kept} and len(ids) + len(kept) == len(samples)
    assert [s.id for s in kept] == [s.id for s in samples if s.id not in ids]  # order kept
    for r in records:
        s = samples[int(r.id[len("index/s") :])]
        assert r.text == f"Report: {task.label_names[s.label]}." and r.image_path == s.image_path
    assert index_labels(records, task) == {r.id: samples[int(r.id[len("index/s") :])].label for r in records}
    again = split_index_records(samples, task, fraction, seed=3, template="Report: {label}.")[1]
    other = split_index_records(samples, task, fraction, seed=4, template="Report: {label}.")[1]
    assert [r.id for r in again] == [r.id for r in records] != [r.id for r in other]


def test_convert_image_folder_with_an_index_split_through_the_cli(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them
    argv = ["convert", "--format", "image_folder", "--src", "images", "--task", "breast", "--out", "out"]
    code, out, err = run([*argv, "--index-fraction", 0.4, "--seed", 2, "--caption-template", "Seen: {label}"], capsys)
    assert code == 0, err
    got = json.loads(out)
    assert got["all"]["samples"] + got["index_records"]["samples"] == 12 and got["index_records"]["samples"] == 5
    samples = list(load_samples("out/all.jsonl", get_task("breast"), verify_images="decode"))
    records = list(load_index_records("out/index_records.jsonl", verify_images="decode"))
    assert {r.text for r in records} == {"Seen: No signs of cancer", "Seen: Signs of cancer"}
    assert not {r.id[len("index/") :] for r in records} & {s.id for s in samples}
    for bad, message in (
        (
            ["--index-fraction", 0.5, "--caption-template", "{label} of {site}"],
            "--caption-template: expected '{label}' and no other field",
        ),
        (["--index-fraction", 1.0], "--index-fraction: expected a share in (0, 1), got 1.0"),
        (["--seed", 1], "--seed: goes with --index-fraction"),
        (
            ["--index-fraction", 0.5, "--index-from", "train"],
            "--index-from: expected one of the splits converted (all)",
        ),
    ):
        code, _out, err = run([*argv, "--out", "out2", *bad], capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err
    code, _out, err = run(
        ["convert", "--format", "vqa_rad", "--src", "s", "--out", "o", "--index-fraction", 0.5], capsys
    )
    assert code == 2 and "--index-fraction: only --format medmnist, image_folder takes it" in err
