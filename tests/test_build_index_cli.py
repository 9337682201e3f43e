"""``jomed-fast build-index``: an index built from another working directory with relative paths
opens from anywhere (and after moving with its data) and finds its images, and ``--samples`` warns,
on one line, about index records that are samples (same id or image sha256)."""

import json
import os
import shutil

import numpy as np
import pytest
from _faults import run, workspace

from jomed_fast.candidate_retrieval import Retrieval
from jomed_fast.data import load_index_records
from jomed_fast.index import Index


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("build_index")
    return root, workspace(root, n_train=3, n_val=2, n_test=2, index_size=10)


def test_relative_paths_from_another_directory_open_from_anywhere(data, tmp_path, capsys, monkeypatch):
    root, src = data
    shutil.copytree(src, tmp_path / "work" / "data")
    (tmp_path / "work" / "runs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "work" / "runs")  # the build runs beside the data, not in its folder
    argv = ["build-index", "--records", "../data/index.jsonl", "--encoder", root / "encoder", "--out", "ix"]
    code, out, err = run([*argv, "--no-progress"], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "work" / "runs" / "ix" / "manifest.json").read_text())
    row = json.loads((tmp_path / "work" / "runs" / "ix" / "records.jsonl").read_text().splitlines()[0])
    assert manifest["image_root"] == "../../data" and not os.path.isabs(row["image_path"])
    want = load_index_records(tmp_path / "work" / "data" / "index.jsonl")
    monkeypatch.chdir(tmp_path / "elsewhere")  # opened from another working directory, by a relative path
    for path in (tmp_path / "work" / "runs" / "ix", "../work/runs/ix"):
        ix = Index.open(path)
        assert ix.check_images() == {"checked": 10, "unchecked": 0}
        retrieval = Retrieval(ix)  # the index's own records, as train-reader opens it without --index-records
        for n in (0, 9):
            assert np.array_equal(np.asarray(retrieval.candidate(n).image), want[n].load_image())
    code, out, err = run(["verify-index", "../work/runs/ix"], capsys)
    assert code == 0 and json.loads(out)["images"] == {"checked": 10, "unchecked": 0}, err
    # the same index moved with its data keeps working: both paths are relative
    shutil.move(tmp_path / "work", tmp_path / "moved")
    assert Index.open(tmp_path / "moved" / "runs" / "ix").check_images()["checked"] == 10


def test_samples_that_are_index_records_are_named_in_one_warning(data, tmp_path, capsys):
    root, src = data
    rows = [json.loads(line) for line in (src / "index.jsonl").read_text().splitlines()]
    # a sample file holding two index images (one under the index id, one under another id) and a
    # sample of its own
    samples = tmp_path / "samples.jsonl"
    own = json.loads((src / "train.jsonl").read_text().splitlines()[0])
    own["image_path"] = str(src / own["image_path"])
    lines = [
        {"id": rows[2]["id"], "image_path": str(src / rows[2]["image_path"]), "answer": "normal"},
        {"id": "copied", "image_path": str(src / rows[7]["image_path"]), "answer": "normal"},
        own,
    ]
    samples.write_text("".join(json.dumps(x) + "\n" for x in lines))
    argv = ["build-index", "--records", src / "index.jsonl", "--encoder", root / "encoder", "--no-progress"]
    code, out, err = run([*argv, "--out", tmp_path / "ix", "--samples", samples], capsys)
    assert code == 0 and json.loads(out)["shared_with_samples"] == 2
    assert err.count("\n") == 1 and err.startswith("jomed-fast build-index: warning: 2 index record(s)")
    assert repr(rows[2]["id"]) in err and repr(rows[7]["id"]) in err
    code, out, err = run([*argv, "--out", tmp_path / "ix", "--samples", src / "test.jsonl"], capsys)
    assert code == 0 and err == "" and json.loads(out)["shared_with_samples"] == 0  # a clean split: silent
    code, _, err = run([*argv, "--out", tmp_path / "ix2", "--samples", tmp_path / "absent.jsonl"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--samples:" in err and "absent.jsonl not found" in err
