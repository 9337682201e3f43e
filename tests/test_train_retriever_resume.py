"""Stage 2 survives SIGKILL: a run killed mid-epoch (after its first checkpoint) and resumed ends with
bitwise the same weights as an uninterrupted run, and its score cache holds exactly one record per
distinct (query, candidate) pair the uninterrupted run scored — none lost, none duplicated, every
row bitwise equal. Refresh is on every 2 steps, so the step-3 checkpoint holds a refreshed candidate
encoder and resuming must restore it too (a resume that skipped it fails this test).
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import _stage2_worker as W
import pytest
import torch
from safetensors.torch import load_file

from jomed_fast.train import latest_checkpoint
from jomed_fast.train.retriever import RetrieverTrainConfig
from jomed_fast.train.score_cache import ScoreCache

CONFIG = RetrieverTrainConfig(
    k=8,
    batch_size=4,
    epochs=2,
    refresh_every=2,
    alpha=0.15,
    lr=1e-2,
    weight_decay=0.01,
    warmup_steps=2,
    tau_reader=0.1,
    tau_retriever=0.1,
    checkpoint_every=3,
    eval_each_epoch=False,
)
WORKER = Path(__file__).with_name("_stage2_worker.py")


def _args(root, run_dir, out, resume):
    return {"root": str(root), "run_dir": str(run_dir), "config": CONFIG.to_dict(), "resume": resume, "out": str(out)}


def _start(root, run_dir, out, resume):
    args = Path(str(out) + ".args.json")
    args.write_text(json.dumps(_args(root, run_dir, out, resume)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(args)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _cache(path):
    with ScoreCache(path) as c:
        assert c.stats.duplicates_on_disk == 0 and c.stats.truncated_bytes >= 0
        return {k: c.get(*k).copy() for k in c.keys()}  # noqa: SIM118 - ScoreCache is not iterable


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return W.build(tmp_path_factory.mktemp("stage2_resume"))


def _kill_after_first_checkpoint(proc, run: Path, box: dict) -> None:
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "LATEST").is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            box["error"] = "the run ended before its first checkpoint" if proc.poll() is not None else "timeout"
            proc.kill()
            return
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    box["killed"] = True


def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(root, tmp_path):
    # a subprocess run, SIGKILLed as soon as its first checkpoint (step 3 of 4: mid-epoch 1) is in
    # place; meanwhile the uninterrupted reference runs here (same code, one thread)
    run = tmp_path / "run"
    proc = _start(root, run, tmp_path / "killed.safetensors", resume=True)
    box: dict = {}
    killer = threading.Thread(target=_kill_after_first_checkpoint, args=(proc, run, box))
    killer.start()
    threads = torch.get_num_threads()
    try:
        W.run(_args(root, tmp_path / "ref", tmp_path / "ref.safetensors", resume=False))
    finally:
        torch.set_num_threads(threads)
        killer.join(timeout=150)
    proc.wait(timeout=30)
    assert box.get("killed") and proc.returncode == -signal.SIGKILL, (box, proc.stderr.read().decode()[-2000:])
    total = 8
    killed_at = latest_checkpoint(run)
    assert killed_at is not None and int(killed_at.name.split("-")[1]) < total
    assert not (tmp_path / "killed.safetensors").exists()

    # resumed with fresh objects loaded from disk (nothing of the killed process survives but its files)
    try:
        W.run(_args(root, run, tmp_path / "resumed.safetensors", resume=True))
    finally:
        torch.set_num_threads(threads)
    ref_result = json.loads((tmp_path / "ref.safetensors.json").read_text())
    assert ref_result["total_steps"] == total and ref_result["steps"] == total
    got = load_file(str(tmp_path / "resumed.safetensors"))
    want = load_file(str(tmp_path / "ref.safetensors"))
    assert set(got) == set(want) and len(got) > 0
    for name in want:
        assert torch.equal(got[name], want[name]), name
    result = json.loads((tmp_path / "resumed.safetensors.json").read_text())
    assert result["steps"] == total and result["epochs"][0]["resumed"]

    # the cache: one record per distinct pair, the same pairs and bitwise the same rows
    ref_cache, run_cache = _cache(tmp_path / "ref" / "score_cache.bin"), _cache(run / "score_cache.bin")
    assert set(run_cache) == set(ref_cache)
    assert ref_result["cache"]["records"] == len(ref_cache) == result["cache"]["records"]
    for key, row in ref_cache.items():
        assert row.tobytes() == run_cache[key].tobytes(), key
