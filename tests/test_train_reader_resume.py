"""Stage 1 survives SIGKILL: a run killed mid-epoch and resumed ends with bitwise the same LoRA
weights, adapter and loss curves as an uninterrupted run (CPU, NF4 tiny Qwen2-VL, retrieval on).

Both runs are separate processes running ``tests/_stage1_run.py``'s ``main`` with the same spec,
forked from the test process (which has torch and transformers imported already: a fresh
interpreter spends ~25 s importing them on a busy 2-core machine); the one to kill pauses after
each step so that the test can poll for its first checkpoint and ``kill -9`` it while the epoch is
still running.
"""

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import _stage1_run  # tests/ is on sys.path (pytest rootdir conftest)
import torch
import transformers  # noqa: F401  (imported before the fork: the children start fast)
from safetensors.torch import load_file
from transformers import Qwen2VLForConditionalGeneration  # noqa: F401

from jomed_fast.data.synthetic import generate
from jomed_fast.index import Index
from jomed_fast.readers import tiny
from jomed_fast.retriever import TinyCLIP
from jomed_fast.train.checkpoint import latest_checkpoint

DATA = {"n_train": 12, "n_val": 4, "n_test": 0, "index_size": 40}
# 12 samples x (1 text + 1 image candidate) = 24 examples; 3 micro-batches of 4 per step -> 2 steps
# per epoch, 3 epochs = 6 steps; a checkpoint every 1 step, validation every 2
CONFIG = {
    "lr": 2e-3,
    "epochs": 3,
    "batch_size": 4,
    "grad_accum": 3,
    "eval_every": 2,
    "save_every": 1,
    "keep": 2,
    "k_text": 1,
    "k_image": 1,
    "seed": 3,
}


def _spec(tmp: Path, name: str, reader: Path, retr: Path, index: Path, sleep_s: float) -> Path:
    spec = {
        "reader": str(reader),
        "retriever": str(retr),
        "index": str(index),
        "run_dir": str(tmp / name),
        "config": CONFIG,
        "data": DATA,
        "sleep_s": sleep_s,
    }
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path


def _start(spec: Path):
    proc = multiprocessing.get_context("fork").Process(target=_stage1_run.main, args=(str(spec),), daemon=True)
    proc.start()
    return proc


def _finish(proc, timeout: float = 120) -> None:
    proc.join(timeout)
    assert proc.exitcode == 0, f"the stage-1 process ended with {proc.exitcode}"


def test_sigkill_mid_epoch_then_resume_is_bitwise_exact(tmp_path):
    reader = tiny.build("qwen2_vl", tmp_path / "reader")
    ds = generate(**DATA)
    torch.manual_seed(0)
    enc = TinyCLIP.from_captions([r.text for r in ds.index], width=8, depth=1, dim=32)
    enc.save(tmp_path / "retriever")
    Index.build(ds.index, enc, tmp_path / "index", batch_size=64, chunk_size=64, progress=False)

    ref = _start(_spec(tmp_path, "ref", reader, tmp_path / "retriever", tmp_path / "index", 0.0))
    victim_spec = _spec(tmp_path, "victim", reader, tmp_path / "retriever", tmp_path / "index", 2.0)
    victim = _start(victim_spec)
    run = tmp_path / "victim"
    deadline = time.monotonic() + 90
    while latest_checkpoint(run) is None:
        assert victim.is_alive(), f"the run ended before its first checkpoint ({victim.exitcode})"
        assert time.monotonic() < deadline, "no checkpoint within 90 s"
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(30)
    assert victim.exitcode == -signal.SIGKILL
    killed_at = json.loads((latest_checkpoint(run) / "state.json").read_text())
    assert killed_at["step"] < 6 and not (run / "adapter").exists()
    assert killed_at["data"]["position"] > 0, f"not mid-epoch: {killed_at['data']}"  # 12 of 24 examples seen

    _finish(_start(_spec(tmp_path, "victim", reader, tmp_path / "retriever", tmp_path / "index", 0.0)))
    _finish(ref)

    a, b = tmp_path / "ref", tmp_path / "victim"
    wa, wb = (
        load_file(str(latest_checkpoint(a) / "weights.safetensors")),
        load_file(str(latest_checkpoint(b) / "weights.safetensors")),
    )
    assert latest_checkpoint(a).name == latest_checkpoint(b).name == "step-00000006"
    assert set(wa) == set(wb) and len(wa) > 0
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    # the weights moved (a resumed run that trained nothing would also "match" a run that trained nothing)
    first = json.loads((a / "result.json").read_text())
    assert first["train_loss"][0][1] != first["train_loss"][-1][1]
    ada = load_file(str(a / "adapter" / "adapter_model.safetensors"))
    adb = load_file(str(b / "adapter" / "adapter_model.safetensors"))
    assert set(ada) == set(adb) and all(torch.equal(ada[k], adb[k]) for k in ada)
    assert any(float(v.abs().sum()) > 0 for k, v in ada.items() if "lora_B" in k)
    ra, rb = json.loads((a / "result.json").read_text()), json.loads((b / "result.json").read_text())
    assert ra["train_loss"] == rb["train_loss"] and ra["val_loss"] == rb["val_loss"]
    assert ra["best_step"] == rb["best_step"] and rb["resumed_from"] is not None and ra["resumed_from"] is None
