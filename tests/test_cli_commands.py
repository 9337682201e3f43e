"""``jomed-fast convert | index-synthetic | verify-index | index-cost | aot`` end to end on tiny inputs,
their one-line errors (exit 2), ``--config``, the ``python -m jomed_fast.index`` alias, the sharded
build under torchrun, and option types taken from the config dataclasses' field types."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from typing import Optional

import numpy as np
import pytest
import yaml
from PIL import Image

from jomed_fast.cli import commands, main
from jomed_fast.cli.options import (
    UNSET,
    add_options,
    config_from,
    config_options,
    option_type,
    resolve,
)
from jomed_fast.data import medmnist_to_jsonl
from jomed_fast.index import build_synthetic_index, index_cost, synthetic_encoder
from jomed_fast.index.__main__ import main as index_alias

N_RECORDS, CHUNK = 300, 64
TINY_ENCODER = ["--width", "8", "--depth", "1", "--dim", "16"]


def run(argv, capsys, entry=main):
    code = entry([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A synthetic index built through ``jomed-fast index-synthetic``, and its JSON line."""
    out = tmp_path_factory.mktemp("synthetic") / "ix"
    code = main(
        [
            "index-synthetic",
            "--records",
            str(N_RECORDS),
            "--out",
            str(out),
            "--chunk-size",
            str(CHUNK),
            "--batch-size",
            "50",
            "--threads",
            "1",
            "--no-progress",
            *TINY_ENCODER,
        ]
    )
    assert code == 0
    return out


def test_index_synthetic_is_the_library_build(synthetic, tmp_path):
    reference = build_synthetic_index(
        N_RECORDS,
        synthetic_encoder(seed=0, width=8, depth=1, dim=16),
        tmp_path / "ref",
        chunk_size=CHUNK,
        batch_size=50,
        progress=False,
    )
    for name in ("image_embeddings.npy", "text_embeddings.npy", "records.jsonl"):
        assert sha(synthetic / name) == sha(reference.path / name), name
    assert (synthetic / "encoder" / "config.json").is_file()  # the built-in encoder, saved for verify-index


def test_verify_index_checks_the_files_and_the_encoder(synthetic, tmp_path, capsys):
    code, out, err = run(["verify-index", synthetic, "--encoder", synthetic / "encoder"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["count"] == N_RECORDS and result["dim"] == 16 and result["ok"]
    assert result["images"] == {"checked": 0, "unchecked": N_RECORDS}  # synthetic records have no image files
    code, out, _ = run(["verify-index", "--index", synthetic, "--no-images"], capsys)  # the flag, not the argument
    assert code == 0 and json.loads(out)["images"] is None
    other = tmp_path / "other_encoder"
    synthetic_encoder(seed=1, width=8, depth=1, dim=16).save(other)
    code, _, err = run(["verify-index", synthetic, "--encoder", other], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("jomed-fast verify-index: error:")
    damaged = tmp_path / "damaged"
    subprocess.run(["cp", "-r", str(synthetic), str(damaged)], check=True)
    with open(damaged / "text_embeddings.npy", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x01" if f.read(1) != b"\x01" else b"\x02")
    code, _, err = run(["verify-index", damaged], capsys)
    assert code == 2 and "text_embeddings.npy: checksum mismatch" in err and err.count("\n") == 1


def test_index_cost_against_the_arithmetic(capsys):
    code, out, _ = run(["index-cost", "--records", 1000, "--dim", 64, "--json"], capsys)
    assert code == 0
    c = json.loads(out)
    assert c["n"] == 1000 and c["bytes_total"] == 1000 * 64 * 2 * 2  # N x D fp16 values, two heads
    assert c == json.loads(json.dumps(index_cost(1000, 64)))
    code, out, _ = run(["index-cost"], capsys)
    assert code == 0 and "| L40 |" in out


def test_index_cost_reads_a_config_and_flags_override_it(tmp_path, capsys):
    cfg = tmp_path / "cost.yaml"
    cfg.write_text(yaml.safe_dump({"records": 1000, "dim": 64, "json": True}))
    code, out, _ = run(["index-cost", "--config", cfg], capsys)
    assert code == 0 and json.loads(out)["bytes_total"] == 1000 * 64 * 4
    code, out, _ = run(["index-cost", "--config", cfg, "--dim", 32], capsys)
    assert code == 0 and json.loads(out)["bytes_total"] == 1000 * 32 * 4
    cfg.write_text("dim: wide\n")
    code, _, err = run(["index-cost", "--config", cfg], capsys)
    assert code == 2 and err == f"jomed-fast index-cost: error: --dim: expected int (in {cfg}), got 'wide'\n"


def test_verify_index_takes_its_index_from_the_config(synthetic, tmp_path, capsys):
    cfg = tmp_path / "verify.yaml"
    cfg.write_text(yaml.safe_dump({"index": str(synthetic), "images": False}))
    code, out, _ = run(["verify-index", "--config", cfg], capsys)
    assert code == 0 and json.loads(out)["count"] == N_RECORDS


def test_python_m_jomed_fast_index_is_the_same_commands(synthetic, capsys):
    table = commands()
    assert (
        run(["cost", "--records", 1000, "--dim", 64, "--json"], capsys, index_alias)[1]
        == run(["index-cost", "--records", 1000, "--dim", 64, "--json"], capsys)[1]
    )
    code, out, _ = run(["verify", synthetic, "--no-images"], capsys, index_alias)
    assert code == 0 and json.loads(out)["count"] == N_RECORDS
    code, _, err = run(["build-synthetic", "--records", 0, "--out", "x"], capsys, index_alias)
    assert code == 2 and err == (
        "python -m jomed_fast.index build-synthetic: error: --records: expected an int >= 1, got 0\n"
    )
    from jomed_fast.index.__main__ import ALIASES

    assert set(ALIASES.values()) <= set(table)


def test_index_synthetic_under_torchrun_matches_one_process(synthetic, tmp_path):
    out = tmp_path / "ix2"
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "jomed_fast.cli",
        "index-synthetic",
        "--records",
        str(N_RECORDS),
        "--out",
        str(out),
        "--chunk-size",
        str(CHUNK),
        "--batch-size",
        "50",
        "--threads",
        "1",
        "--no-progress",
        *TINY_ENCODER,
    ]
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=180, check=False, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and lines[0]["world"] == 2 and lines[0]["rank"] == 0  # rank 0 reports
    for name in ("image_embeddings.npy", "text_embeddings.npy", "records.jsonl"):
        assert sha(out / name) == sha(synthetic / name), name


# ------------------------------------------------------------------------------------------ convert
def _medmnist(path, n=(5, 3, 4)):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (count, 1)).astype(np.uint8)
    np.savez(path, **arrays)
    return path


def _rows(path):
    return [json.loads(line) for line in open(path)]


def test_convert_medmnist_is_the_library_conversion(tmp_path, capsys):
    src = _medmnist(tmp_path / "breastmnist_28.npz")
    code, out, err = run(
        ["convert", "--format", "medmnist", "--src", src, "--task", "breast", "--out", tmp_path / "cli"], capsys
    )
    assert code == 0, err
    written = json.loads(out)
    assert {s: w["samples"] for s, w in written.items()} == {"train": 5, "val": 3, "test": 4}  # the file's counts
    reference = medmnist_to_jsonl(src, tmp_path / "ref", "breast")
    for split, path in reference.items():
        cli_rows, ref_rows = _rows(written[split]["path"]), _rows(path)
        assert [{k: v for k, v in r.items() if k != "image_path"} for r in cli_rows] == [
            {k: v for k, v in r.items() if k != "image_path"} for r in ref_rows
        ]
        for c, r in zip(cli_rows, ref_rows):
            assert sha(tmp_path / "cli" / c["image_path"]) == sha(tmp_path / "ref" / r["image_path"])
    code, out, _ = run(
        [
            "convert",
            "--format",
            "medmnist",
            "--src",
            src,
            "--task",
            "breast",
            "--out",
            tmp_path / "few",
            "--splits",
            "test",
            "--limit",
            2,
        ],
        capsys,
    )
    assert code == 0 and {s: w["samples"] for s, w in json.loads(out).items()} == {"test": 2}
    assert sorted(p.name for p in (tmp_path / "few").glob("*.jsonl")) == ["test.jsonl"]


def _vqa_rad(root):
    """A VQA-RAD release: train = 2 yes/no + 1 open question, test = 1 + 1."""
    (root / "VQA_RAD Image Folder").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(root / "VQA_RAD Image Folder" / name)
    rows = [
        ("a.jpg", "is there a mass?", "Yes", "freeform"),
        ("b.jpg", "is it normal?", "no", "para"),
        ("a.jpg", "what organ is shown?", "liver", "freeform"),
        ("b.jpg", "any fracture?", "yes", "test_freeform"),
        ("b.jpg", "which side?", "left", "test_para"),
    ]
    data = [
        {"image_name": i, "question": q, "answer": a, "answer_type": "CLOSED", "phrase_type": p} for i, q, a, p in rows
    ]
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(data))
    return root


def test_convert_vqa_rad_by_kind(tmp_path, capsys):
    src = _vqa_rad(tmp_path / "VQA_RAD")
    code, out, err = run(["convert", "--format", "vqa_rad", "--src", src, "--out", tmp_path / "all"], capsys)
    assert code == 0, err
    written = json.loads(out)
    assert {name: w["samples"] for name, w in written.items()} == {
        "train_closed": 2,
        "train_open": 1,
        "test_closed": 1,
        "test_open": 1,
    }
    assert [r["answer"] for r in _rows(written["train_closed"]["path"])] == ["yes", "no"]
    assert [(r["question"], r["answer"]) for r in _rows(written["test_open"]["path"])] == [("which side?", "left")]
    code, out, _ = run(
        [
            "convert",
            "--format",
            "vqa_rad",
            "--src",
            src,
            "--out",
            tmp_path / "closed",
            "--kinds",
            "closed",
            "--splits",
            "train",
        ],
        capsys,
    )
    assert code == 0 and list(json.loads(out)) == ["train_closed"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["convert", "--format", "medmnist", "--src", "x.npz", "--out", "o"],
            "--task: required with --format medmnist",
        ),
        (
            ["convert", "--format", "slake", "--src", "s", "--out", "o", "--task", "breast"],
            "--task: only --format medmnist, image_folder takes it, got --format slake",
        ),
        (
            ["convert", "--format", "medmnist", "--src", "x.npz", "--out", "o", "--task", "breast", "--kinds", "open"],
            "--kinds: only --format vqa_rad, slake, pathvqa takes it",
        ),
        (
            ["convert", "--format", "vqa_rad", "--src", "s", "--out", "o", "--splits", "val"],
            "--splits: expected values among train, test for --format vqa_rad, got 'val'",
        ),
        (
            ["convert", "--format", "vqa_rad", "--src", "s", "--out", "o", "--kinds", "yesno"],
            "--kinds: expected values among closed, open, all (on the command line), got 'yesno'",
        ),
        (
            ["convert", "--format", "vqa_rad", "--src", "s", "--out", "o", "--limit", "0"],
            "--limit: expected an int >= 1",
        ),
        (
            ["convert", "--format", "roco", "--src", "s", "--out", "o"],
            "--format: expected one of medmnist, image_folder, vqa_rad",
        ),
        (
            ["convert", "--format", "medmnist", "--src", "/nonexistent.npz", "--out", "o", "--task", "breast"],
            "/nonexistent.npz",
        ),
        (["index-synthetic", "--records", "many", "--out", "o"], "--records: expected int (on the command line)"),
        (
            ["index-synthetic", "--records", "5", "--out", "o", "--batch-size", "0"],
            "--batch-size: expected an int >= 1",
        ),
        (["index-synthetic", "--records", "5"], "--out: required"),
        (["verify-index"], "--index: required (give INDEX or the flag or set index in the --config file)"),
        (["verify-index", "/nonexistent/ix"], "/nonexistent/ix/manifest.json not found"),
        (["index-cost", "--nprobe", "0"], "--nprobe: expected an int >= 1, got 0"),
        (["aot", "--arch", "sm_90"], "--arch: expected SM versions as ints (89 90), got 'sm_90'"),
        (["aot", "--modules", "no_such_kernel"], "--modules: expected values among class_log_softmax"),
    ],
)
def test_bad_options_are_one_line_with_exit_code_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing a refused command might write lands in the repository
    code, _out, err = run(argv, capsys)
    assert code == 2 and message in err and err.count("\n") == 1 and err.startswith(f"jomed-fast {argv[0]}: error:")


# ------------------------------------------------------------------------------------------ aot
def test_aot_help_and_dispatch(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["aot", "--help"])
    assert exc.value.code == 0 and {"--arch", "--modules", "--json"} <= set(capsys.readouterr().out.split())
    from jomed_fast.kernels import aot

    seen = []
    monkeypatch.setattr(aot, "main", lambda argv=None: seen.append(argv) or 1)  # 1: a configuration spilled
    assert main(["aot", "--arch", "90", "--modules", "fuse_candidates", "topk_similarity", "--json", "r.json"]) == 1
    assert seen == [["--arch", "90", "--modules", "fuse_candidates", "topk_similarity", "--json", "r.json"]]
    assert main(["aot"]) == 1 and seen[-1] == []


def test_aot_exit_code_is_the_checks_own():
    # the real check, refusing to compile under the interpreter before it imports Triton
    proc = subprocess.run(
        [sys.executable, "-m", "jomed_fast.cli", "aot", "--arch", "90"],
        capture_output=True,
        text=True,
        env=dict(os.environ, TRITON_INTERPRET="1"),
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2 and "TRITON_INTERPRET is set" in proc.stderr


# ------------------------------------------------------------------------------------------ option types
@dataclasses.dataclass(frozen=True)
class Settings:  # string annotations (this module imports annotations from __future__)
    count: int | None = 3
    rate: float = 0.5
    name: Optional[str] = None  # noqa: UP045 (the other spelling of str | None)
    on: bool = True


def _values(options, argv):
    parser = argparse.ArgumentParser()
    add_options(parser, options)
    return resolve(options, parser.parse_args(argv))


def test_option_types_are_the_field_types():
    assert [(o.name, o.type, o.nullable) for o in config_options(Settings)] == [
        ("count", int, True),
        ("rate", float, False),
        ("name", str, True),
        ("on", bool, False),
    ]
    options = config_options(Settings)
    assert config_from(Settings, _values(options, [])) == Settings()  # nothing given: the defaults
    assert _values(options, [])["count"] is UNSET
    given = config_from(Settings, _values(options, ["--count", "none", "--rate", "2", "--no-on", "--name", "x"]))
    assert given == Settings(count=None, rate=2.0, name="x", on=False)
    assert config_from(Settings, _values(options, ["--count", "7"])).count == 7
    with pytest.raises(ValueError, match=r"--count: expected int \(on the command line\), got 'x'"):
        _values(options, ["--count", "x"])
    with pytest.raises(ValueError, match=r"--rate: expected float \(on the command line\), got 'none'"):
        _values(options, ["--rate", "none"])  # not nullable: none is not a float


def test_option_types_from_real_annotations_and_refused_ones():
    real = dataclasses.make_dataclass("Real", [("k", int, 2), ("tau", Optional[float], None)])  # noqa: UP045 (types, not strings)
    assert [(o.type, o.nullable) for o in config_options(real)] == [(int, False), (float, True)]
    odd = dataclasses.make_dataclass("Odd", [("tags", list[str], dataclasses.field(default_factory=list))])
    with pytest.raises(TypeError, match=r"Odd\.tags: option type list\[str\] is not int/float/str/bool"):
        config_options(odd)
    assert option_type(Settings, "name") == (str, True)


def test_a_nullable_training_option_turns_off_with_none(tmp_path, capsys):
    from jomed_fast.train import ReaderTrainConfig

    options = commands()["train-reader"].options
    required = ["--reader", "r", "--train", "t.jsonl", "--run-dir", "run"]
    assert ReaderTrainConfig().max_grad_norm == 1.0
    assert config_from(ReaderTrainConfig, _values(options, required)).max_grad_norm == 1.0
    off = config_from(ReaderTrainConfig, _values(options, [*required, "--max-grad-norm", "none"]))
    assert off.max_grad_norm is None
    cfg = tmp_path / "s1.yaml"
    cfg.write_text("max_grad_norm: null\nlr: null\n")  # null: None for the nullable field, refused for lr
    with pytest.raises(ValueError, match=rf"--lr: expected float \(in {cfg}\), got none"):
        _values(options, [*required, "--config", str(cfg)])
    with pytest.raises(SystemExit):
        main(["train-reader", "--help"])
    assert "--max-grad-norm FLOAT|none" in capsys.readouterr().out
