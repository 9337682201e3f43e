"""The machine's side of a run through the CLI: a full disk (a file-size limit in a subprocess), a
read-only or missing folder, a directory where a file was expected, damaged model files (a flipped
bit in an adapter, truncated weights without a manifest): each is one line on stderr naming the
file, exit 2, and nothing finished is lost; ``--debug`` shows the traceback instead.

The other faults have their own files: ``test_faults_inference.py`` (predict / evaluate / analyze),
``test_faults_data.py`` (images, index builds, records), ``test_faults_training.py`` (both stages),
``test_manifest.py`` (model files); ``docs/reliability.md`` lists every case and its test.
"""

import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _faults import base_args, one_line_error, run, sha

from jomed_fast.infer import read_predictions
from jomed_fast.readers import load_reader

pytestmark = pytest.mark.usefixtures("one_thread")
HERE = Path(__file__).resolve().parent


def _limited(max_bytes: int):
    """preexec_fn: files may grow to ``max_bytes`` (writes past it fail with EFBIG, as on a full disk)."""

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer outright
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return apply


def test_a_full_disk_mid_predict_is_one_line_and_the_rerun_completes_the_file(files, full_run, tmp_path):
    out = tmp_path / "p.jsonl"
    argv = [sys.executable, "-m", "jomed_fast.cli", *map(str, base_args(files, out))]
    limit = len(full_run[1]) // 2  # room for part of the predictions only
    proc = subprocess.run(argv, capture_output=True, text=True, preexec_fn=_limited(limit), cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("jomed-fast ")]
    assert proc.returncode == 2 and len(errors) == 1 and "File too large" in errors[0], proc.stderr
    assert str(out) in errors[0]
    kept = read_predictions(out)
    assert 0 < len(kept) < len(read_predictions(full_run[0]))  # what was finished is kept
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path)  # the disk has room again
    assert proc.returncode == 0, proc.stderr
    assert [r.query_id for r in read_predictions(out)] == [r.query_id for r in read_predictions(full_run[0])]
    assert [r.fused for r in read_predictions(out)] == [r.fused for r in read_predictions(full_run[0])]


def test_a_read_only_or_impossible_output_folder_is_one_line(full_run, tmp_path, capsys):
    if os.geteuid() == 0:
        blocker = tmp_path / "a-file"  # root writes anywhere: a folder under a file is impossible for all
        blocker.write_text("x")
        target = blocker / "metrics.json"
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        target = ro / "metrics.json"
    before = sha(full_run[0])
    code, _o, err = run(["evaluate", "--predictions", full_run[0], "--out", target], capsys)
    one_line_error(code, err, str(target.parent))
    assert sha(full_run[0]) == before and not target.exists()


def test_a_directory_given_for_a_file_is_one_line(full_run, tmp_path, capsys):
    (tmp_path / "metrics.json").mkdir()
    code, _o, err = run(["evaluate", "--predictions", full_run[0], "--out", tmp_path / "metrics.json"], capsys)
    one_line_error(code, err, "metrics.json")
    code, _o, err = run(["evaluate", "--predictions", tmp_path], capsys)
    one_line_error(code, err, str(tmp_path))


def test_a_flipped_bit_in_the_adapter_is_one_line_naming_the_file(files, tmp_path, capsys):
    _root, _data, reader_dir = files
    reader = load_reader(reader_dir, lora=True, device="cpu")
    with torch.no_grad():
        for p in reader.lora_parameters().values():
            p.normal_(0, 0.05)
    adapter = reader.save_adapter(tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01
    weights.write_bytes(bytes(data))
    out = tmp_path / "p.jsonl"
    code, _o, err = run(base_args(files, out, "--adapter", adapter), capsys)
    one_line_error(code, err, "adapter_model.safetensors", "sha256 differs")
    assert not out.exists() or read_predictions(out) == []


def test_truncated_reader_weights_without_a_manifest_are_one_line(files, tmp_path, capsys):
    import shutil

    _root, _data, reader_dir = files
    broken = tmp_path / "reader"
    shutil.copytree(reader_dir, broken)
    (broken / "jomed_manifest.json").unlink()  # as a checkpoint from the hub: nothing to verify against
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    root, data, _reader = files
    argv = base_args((root, data, broken), tmp_path / "p.jsonl")
    code, _o, err = run(argv, capsys)
    one_line_error(code, err, str(broken), "truncated or damaged")


def test_debug_shows_the_traceback_of_a_user_error(full_run, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jomed_fast.cli",
            "--debug",
            "evaluate",
            "--predictions",
            str(tmp_path / "missing.jsonl"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "jomed_fast.cli", "evaluate", "--predictions", str(tmp_path / "missing.jsonl")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_every_case_of_the_reliability_page_names_a_test_that_exists():
    page = (HERE.parent / "docs" / "reliability.md").read_text()
    named = re.findall(r"`(test_[a-z_]+\.py)::(test_[a-z0-9_]+)`", page)
    assert len(named) >= 30, "the page lists the fault matrix with the tests that hold it"
    for module, test in named:
        source = (HERE / module).read_text()
        assert re.search(rf"^def {test}\(", source, re.M), f"docs/reliability.md names {module}::{test}, not found"
