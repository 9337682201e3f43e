"""What the project writes gets the mode a plain ``open(path, "w")`` / ``os.mkdir(path)`` gives
under the process umask (0o666 & ~umask, 0o777 & ~umask), atomic writers included: a team on a
shared cluster with umask 002 or 022 can read each other's runs, one with 077 keeps them private.
``tempfile.mkstemp`` / ``mkdtemp`` would give 0600 / 0700 whatever the umask."""

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from jomed_fast._files import atomic_write_via, make_temp_dir, make_temp_file, replace_dir_atomically
from jomed_fast.analysis.prediction_records import Candidate, PredictionRecord, read_jsonl, write_jsonl
from jomed_fast.data.io import atomic_write_bytes, atomic_write_json, atomic_write_jsonl, atomic_write_text, save_png
from jomed_fast.train import latest_checkpoint, save_checkpoint

UMASKS = (0o022, 0o077, 0o002)


@pytest.fixture(params=UMASKS, ids=[f"umask{u:03o}" for u in UMASKS])
def umask(request):
    """Set the process umask for one test (pytest runs tests on one thread; restored after)."""
    before = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(before)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def plain(tmp_path, umask):
    """The modes a plain ``open`` and ``os.mkdir`` give in ``tmp_path`` under ``umask``."""
    (tmp_path / "plain.txt").write_text("x")
    os.mkdir(tmp_path / "plain_dir")
    file_mode, dir_mode = mode(tmp_path / "plain.txt"), mode(tmp_path / "plain_dir")
    if (file_mode, dir_mode) != (0o666 & ~umask, 0o777 & ~umask):  # a default ACL on the tmp dir
        pytest.skip(f"{tmp_path} does not apply the umask as is (file {file_mode:o}, dir {dir_mode:o})")
    return file_mode, dir_mode


def test_temp_files_and_dirs_follow_the_umask(tmp_path, plain):
    fd, path = make_temp_file(tmp_path, prefix="a.", suffix=".tmp")
    os.close(fd)
    assert Path(path).parent == tmp_path and Path(path).name.startswith("a.") and path.endswith(".tmp")
    assert mode(path) == plain[0]
    assert mode(make_temp_dir(tmp_path, prefix="d.")) == plain[1]
    names = {make_temp_dir(tmp_path, prefix="d.") for _ in range(20)}
    assert len(names) == 20


def test_atomic_file_writers_follow_the_umask(tmp_path, plain):
    file_mode = plain[0]
    writers = {
        "via.txt": lambda p: atomic_write_via(p, lambda tmp: Path(tmp).write_text("x")),
        "bytes.bin": lambda p: atomic_write_bytes(p, b"x", fsync=True),
        "text.txt": lambda p: atomic_write_text(p, "x"),
        "obj.json": lambda p: atomic_write_json(p, {"a": 1}),
        "image.png": lambda p: save_png(p, torch.zeros(4, 4, 3, dtype=torch.uint8).numpy()),
    }
    for name, write in writers.items():
        write(tmp_path / name)
        assert mode(tmp_path / name) == file_mode, name
        write(tmp_path / name)  # replacing an existing file too
        assert mode(tmp_path / name) == file_mode, name
    # in a directory the writer creates
    atomic_write_text(tmp_path / "new" / "sub" / "x.txt", "x")
    assert mode(tmp_path / "new" / "sub" / "x.txt") == file_mode and mode(tmp_path / "new" / "sub") == plain[1]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_jsonl_writers_follow_the_umask(tmp_path, plain):
    from jomed_fast.infer.output import PredictionsFile, lock_path, meta_path, read_predictions

    file_mode = plain[0]
    assert atomic_write_jsonl(tmp_path / "rows.jsonl", [{"a": 1}, {"a": 2}]) == 2
    assert mode(tmp_path / "rows.jsonl") == file_mode
    record = PredictionRecord(
        query_id="q",
        gold=1,
        kind="multiclass",
        candidates=[Candidate(id="c", head="text", score=0.5, probs=[0.4, 0.6], prediction=1)],
        fused=1,
        fused_probs=[0.4, 0.6],
    )
    write_jsonl(str(tmp_path / "records.jsonl"), [record])
    assert mode(tmp_path / "records.jsonl") == file_mode and read_jsonl(str(tmp_path / "records.jsonl")) == [record]
    # the predictions file of ``predict``, its identity sidecar and its lock (created, then appended to)
    out = tmp_path / "preds" / "p.jsonl"
    with PredictionsFile(out, {"k": "1"}) as held:
        assert held.done == {}
        held.append([record])
    assert {mode(p) for p in (out, meta_path(out), lock_path(out))} == {file_mode}
    assert read_predictions(out) == [record]


def test_run_directories_follow_the_umask(tmp_path, plain):
    file_mode, dir_mode = plain

    def fill(d: Path) -> None:
        (d / "a.json").write_text(json.dumps({"a": 1}))
        atomic_write_text(d / "b.txt", "b")

    out = replace_dir_atomically(tmp_path / "run", fill)
    assert mode(out) == dir_mode and mode(out / "a.json") == file_mode and mode(out / "b.txt") == file_mode
    assert mode(out / "jomed_manifest.json") == file_mode
    out = replace_dir_atomically(tmp_path / "run", fill)  # replacing an existing directory too
    assert mode(out) == dir_mode and sorted(p.name for p in tmp_path.iterdir()) == ["plain.txt", "plain_dir", "run"]
    # a training checkpoint: checkpoints/, step-N/ and its files, LATEST
    weight = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([weight], lr=0.1)
    step = save_checkpoint(tmp_path / "train", 1, params={"w": weight}, optimizer=opt)
    assert latest_checkpoint(tmp_path / "train") == step
    assert mode(tmp_path / "train") == dir_mode and mode(step.parent) == dir_mode and mode(step) == dir_mode
    assert {p.name: mode(p) for p in step.iterdir()} == {
        name: file_mode for name in ("weights.safetensors", "state.safetensors", "state.json", "jomed_manifest.json")
    }
    assert mode(step.parent / "LATEST") == file_mode
