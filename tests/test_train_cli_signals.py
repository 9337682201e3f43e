"""Training through the command line as a cluster runs it: ``jomed-fast train-reader`` in its own
process, sent SIGTERM mid-run, exits with code 143 and one line on stderr (and nothing else: with
``--no-progress`` neither bitsandbytes' ``kernels`` notice nor transformers' weight-loading bar
shows), and the same command then resumes to bitwise the adapter and the log of an uninterrupted
run. ``--report-to tensorboard`` without the package is one line naming it, before anything loads.
"""

import logging
import os
import signal
import subprocess
import sys
import time

import pytest
from _faults import run, workspace
from safetensors.torch import load_file

from jomed_fast.cli.quiet import BNB_LOGGER, quiet_libraries
from jomed_fast.readers import tiny
from jomed_fast.train.run_log import TIMING_FIELDS, read_log

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 40  # 4 samples, 2 per step: 2 steps per epoch; long enough for a signal to land mid-run


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    data = workspace(root, n_train=4, n_val=2, n_test=0, index_size=8)
    return data, tiny.build("qwen2_vl", root / "reader")


def _args(files, run_dir, *extra):
    data, reader = files
    return [
        "train-reader",
        "--reader",
        str(reader),
        "--train",
        str(data / "train.jsonl"),
        "--val",
        str(data / "val.jsonl"),
        "--run-dir",
        str(run_dir),
        "--epochs",
        "20",
        "--max-steps",
        str(STEPS),
        "--batch-size",
        "2",
        "--eval-every",
        "10",
        "--save-every",
        "7",
        "--no-gradient-checkpointing",
        *extra,
    ]


def _untimed(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


def _wait_for_a_step(proc, run_dir, timeout=240.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(r["kind"] == "train" for r in read_log(run_dir)):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "no step within the timeout"
        time.sleep(0.02)


def test_sigterm_exits_143_with_one_line_and_the_same_command_resumes_exactly(files, tmp_path, capsys):
    victim = tmp_path / "victim"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jomed_fast.cli", *_args(files, victim, "--no-progress", "--quantization", "nf4")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_a_step(proc, victim)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    step = int((victim / "checkpoints" / "LATEST").read_text().strip().split("-")[1])
    assert 1 <= step < STEPS and out == ""
    line = f"jomed-fast train-reader: stopped by SIGTERM after step {step} of {STEPS}; checkpoint "
    assert err.startswith(line) and err.endswith("; rerun the same command to resume\n") and err.count("\n") == 1, err
    assert read_log(victim)[-1]["step"] == step and not (victim / "adapter").exists()

    # the same command resumes; an uninterrupted run is the reference (both in this process)
    code, out, err = run(_args(files, victim, "--no-progress", "--quantization", "nf4"), capsys)
    assert code == 0, err
    code, _, err = run(_args(files, tmp_path / "ref", "--no-progress", "--quantization", "nf4"), capsys)
    assert code == 0, err
    a = load_file(str(victim / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ref" / "adapter" / "adapter_model.safetensors"))
    assert set(a) == set(b) and all(a[k].equal(b[k]) for k in a)
    assert _untimed(read_log(victim)) == _untimed(read_log(tmp_path / "ref"))
    assert len([r for r in read_log(victim) if r["kind"] == "train"]) == STEPS


def test_no_progress_keeps_the_weight_loading_bar_off_stderr(files, tmp_path, capsys):
    args = _args(files, tmp_path / "quiet", "--max-steps", "1")
    code, _, err = run([*args, "--no-progress"], capsys)
    assert code == 0 and "Loading weights" not in err, err
    code, _, err = run([*_args(files, tmp_path / "loud", "--max-steps", "1"), "--progress"], capsys)
    assert code == 0 and "Loading weights" in err  # the bar the quiet run kept off
    code, _, err = run(["--quiet", *_args(files, tmp_path / "quieter", "--max-steps", "1")], capsys)
    assert code == 0 and err == "", err  # --quiet: the command's own bars off as well


def test_the_bitsandbytes_kernels_notice_is_dropped_and_nothing_else(caplog):
    notice = "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already `pip install kernels`"
    logger = logging.getLogger(BNB_LOGGER)
    with caplog.at_level(logging.WARNING, logger=BNB_LOGGER):
        with quiet_libraries():
            logger.warning(notice, "No module named 'kernels'")
            logger.warning("bitsandbytes could not load its CPU library")
        logger.warning(notice, "outside")
    assert [r.getMessage()[:40] for r in caplog.records] == [
        "bitsandbytes could not load its CPU libr",
        "Failed to load CPU gemm_4bit_forward fro",
    ]


def test_report_to_tensorboard_without_the_package_is_one_line_before_anything_loads(
    files, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    args = _args(files, tmp_path / "run", "--no-progress", "--report-to", "tensorboard")
    args[args.index("--reader") + 1] = str(tmp_path / "no_reader")  # were it loaded first, this would fail
    code, _, err = run(args, capsys)
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "optional dependency 'tensorboard'" in lines[0] and "pip install 'jomed_fast[dev]'" in lines[0]
    assert not (tmp_path / "run").exists()
    code, _, err = run([*args[:-2], "--report-to", "wandb"], capsys)
    assert code == 2 and "--report-to: expected one of none, tensorboard" in err
