"""The training history (``run_dir/log.jsonl``, ``jomed_fast.train.run_log``) and SIGTERM in the loop.

* every step and every evaluation is a line, with the numbers the stage's result holds; the
  learning rate against transformers' own warm-up + cosine schedule, the gradient norm against a
  float64 norm of the first step's gradients computed apart from the loop;
* a crash (an exception after a step, then a torn line as SIGKILL leaves) and a resume give the log
  an uninterrupted run writes, but for its timing fields; the same for TensorBoard's events, read
  back with TensorBoard's own ``EventAccumulator``;
* SIGTERM (sent by the run to itself, so it lands after a known step) stops both stages after
  that step with a checkpoint and ``StoppedBySignal``, puts the previous handler back, and the
  resumed run ends with bitwise the weights and the log of an uninterrupted one.
"""

import copy
import json
import math
import os
import signal

import pytest
import torch

from jomed_fast.data.synthetic import generate
from jomed_fast.readers import load_reader, tiny
from jomed_fast.train import reader_loss
from jomed_fast.train.checkpoint import latest_checkpoint, load_weights
from jomed_fast.train.data_order import DataOrder
from jomed_fast.train.loop import StoppedBySignal
from jomed_fast.train.reader import ReaderTrainConfig, train_reader
from jomed_fast.train.reader_data import ExampleSet
from jomed_fast.train.run_log import LOG_FILE, TIMING_FIELDS, RunLog, read_log

pytestmark = pytest.mark.usefixtures("one_thread")

# 6 samples (reader only: one example each), 2 per step: 3 steps per epoch, 3 epochs = 9 steps
CONFIG = ReaderTrainConfig(
    lr=2e-3,
    epochs=3,
    batch_size=2,
    eval_every=3,
    save_every=2,
    keep=2,
    seed=3,
    gradient_checkpointing=False,
)
TOTAL = 9


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("runlog")
    return tiny.build("qwen2_vl", root / "reader"), generate(n_train=6, n_val=4, n_test=0, index_size=8)


def _reader(path):
    torch.manual_seed(0)  # the fresh adapter's A matrices: the same in every run
    return load_reader(path, lora=True, device="cpu")


def _train(stage1, run_dir, config=CONFIG, on_step=None):
    path, ds = stage1
    return train_reader(config, _reader(path), ds.task, ds.train, ds.val, run_dir, progress=False, on_step=on_step)


def _untimed(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


def _weights(run_dir):
    return load_weights(latest_checkpoint(run_dir))


@pytest.fixture(scope="module")
def reference(stage1, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    return run, _train(stage1, run)


# ------------------------------------------------------------------------------------------ the file
def test_lines_are_appended_a_torn_tail_is_skipped_and_a_resume_keeps_its_prefix(tmp_path):
    with RunLog(tmp_path, None) as log:
        for step in range(1, 6):
            log.write("train", step, step / 5, {"loss": 1.0 / step, "grad_norm": math.inf})
        log.write("eval", 5, 1.0, {"val_loss": 0.5})
    rows = read_log(tmp_path)
    assert [(r["kind"], r["step"]) for r in rows] == [*(("train", s) for s in range(1, 6)), ("eval", 5)]
    assert rows[0]["grad_norm"] is None and rows[2]["loss"] == 1 / 3  # not finite: null
    assert all(b["elapsed_s"] >= a["elapsed_s"] for a, b in zip(rows, rows[1:]))
    path = tmp_path / LOG_FILE
    with open(path, "ab") as f:
        f.write(b'{"kind": "train", "step": 6, "lo')  # a write SIGKILL cut short
    assert read_log(tmp_path) == rows

    # a resume from step 3 drops steps 4, 5, the eval and the torn tail; elapsed time goes on
    with RunLog(tmp_path, 3) as log:
        assert _untimed(read_log(tmp_path)) == _untimed(rows[:3])
        assert log.write("train", 4, 0.8, {"loss": 0.25})["elapsed_s"] >= rows[2]["elapsed_s"]
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4]
    with RunLog(tmp_path, None):  # a fresh run starts from an empty log
        assert read_log(tmp_path) == []

    path.write_text('{"kind": "train", "step": 1}\nnot json\n{"kind": "train", "step": 3}\n')
    with pytest.raises(ValueError, match=r"log\.jsonl:2: expected a JSON object per line"):
        read_log(tmp_path)
    with pytest.raises(ValueError, match="log_every: expected an int >= 1"):
        RunLog(tmp_path / "x", None, log_every=0)
    with pytest.raises(ValueError, match="report_to: expected one of"):
        RunLog(tmp_path / "x", None, report_to="wandb")


# ------------------------------------------------------------------------------------------ contents
def test_every_step_and_evaluation_is_a_line_with_the_results_numbers(stage1, reference):
    from transformers import get_cosine_schedule_with_warmup

    run, result = reference
    rows = read_log(run)
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [(r["step"], r["loss"]) for r in train] == [tuple(x) for x in result.train_loss]
    assert [(r["step"], r["val_loss"]) for r in evals] == [tuple(x) for x in result.val_loss]
    assert [r["step"] for r in evals] == [0, 3, 6, 9] and rows[0]["kind"] == "eval"
    assert [r["epoch"] for r in train] == pytest.approx([s / 3 for s in range(1, TOTAL + 1)])
    assert all(r["examples"] == 2 and r["examples_per_s"] > 0 and r["seconds"] > 0 for r in train)

    # the learning rate each step applied: transformers' schedule (W = ceil(0.1 * 9) = 1)
    opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=CONFIG.lr)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(CONFIG.warmup_ratio * TOTAL), TOTAL)
    want = []
    for _ in range(TOTAL):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [r["lr"] for r in train] == pytest.approx(want, rel=1e-12, abs=1e-15)

    # the first step's gradient norm (before clipping at 1.0): the same examples, float64 norm
    path, ds = stage1
    reader = _reader(path)
    reader.train()
    examples = ExampleSet(list(ds.train), ds.task, CONFIG.layout)
    (batch,) = DataOrder(len(examples), CONFIG.seed, True).next_step(0, 0, CONFIG.batch_size, 1)
    inputs = examples.encode(reader, batch)
    nll, _ = reader_loss.answer_nll(reader, inputs)
    (nll / reader_loss.count_answer_tokens(inputs["labels"])).backward()
    grads = [p.grad.double().flatten() for p in reader.trainable_parameters().values() if p.grad is not None]
    norm = float(torch.linalg.vector_norm(torch.cat(grads)))
    assert train[0]["grad_norm"] == pytest.approx(norm, rel=1e-5) and norm > CONFIG.max_grad_norm


def test_a_crash_then_resume_gives_the_uninterrupted_log(stage1, reference, tmp_path):
    run = tmp_path / "run"

    def crash(info):
        if info["step"] == 5:  # step 5 is logged; the last checkpoint is step 4
            raise RuntimeError("the machine went away")

    with pytest.raises(RuntimeError, match="went away"):
        _train(stage1, run, on_step=crash)
    assert [r["step"] for r in read_log(run)][-1] == 5 and latest_checkpoint(run).name == "step-00000004"
    with open(run / LOG_FILE, "ab") as f:
        f.write(b'{"kind": "train", "step": 6, "loss": 0.')  # and a torn line
    # the resume drops everything past step 4 first, and takes another cadence of checkpoints
    result = _train(stage1, run, CONFIG.replace(save_every=3, keep=3))
    ref_run, ref_result = reference
    assert _untimed(read_log(run)) == _untimed(read_log(ref_run))
    assert result.train_loss == ref_result.train_loss
    got, want = _weights(run), _weights(ref_run)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_a_coarser_cadence_logs_every_nth_step_and_the_last(stage1, reference, tmp_path):
    _train(stage1, tmp_path / "run", CONFIG.replace(log_every=4))
    rows = read_log(tmp_path / "run")
    assert [r["step"] for r in rows if r["kind"] == "train"] == [4, 8, 9]
    full = {(r["kind"], r["step"]): r for r in _untimed(read_log(reference[0]))}
    assert all(full[(r["kind"], r["step"])] == r for r in _untimed(rows))


# ------------------------------------------------------------------------------------------ tensorboard
def _scalars(log_dir) -> dict:
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(log_dir), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_holds_the_logs_scalars_after_a_crash_and_resume(stage1, tmp_path):
    pytest.importorskip("tensorboard")  # the dev extra installs it
    run, config = tmp_path / "run", CONFIG.replace(report_to="tensorboard")

    def crash(info):
        if info["step"] == 5:
            raise RuntimeError("the machine went away")

    with pytest.raises(RuntimeError):
        _train(stage1, run, config, on_step=crash)
    _train(stage1, run, config)
    rows = read_log(run)
    scalars = _scalars(run / "tensorboard")
    for kind, key in (("train", "loss"), ("train", "lr"), ("train", "grad_norm"), ("eval", "val_loss")):
        want = [(r["step"], r[key]) for r in rows if r["kind"] == kind]
        got = scalars[f"{kind}/{key}"]  # step 5 once: the first process's events past step 4 are purged
        assert [s for s, _ in got] == [s for s, _ in want], key
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), key  # float32 events


# ------------------------------------------------------------------------------------------ SIGTERM
def _terminate_at(step):
    def on_step(info):
        if info["step"] == step:
            os.kill(os.getpid(), signal.SIGTERM)

    return on_step


def test_sigterm_stops_stage1_after_the_step_with_a_checkpoint_and_resumes_exactly(stage1, reference, tmp_path):
    run, seen = tmp_path / "run", []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with pytest.raises(StoppedBySignal) as stopped:
            _train(stage1, run, on_step=_terminate_at(5))  # step 5 is not on the checkpoint cadence
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL and seen == []
        assert signal.getsignal(signal.SIGTERM).__name__ == "<lambda>"  # the handler it found is back
    finally:
        signal.signal(signal.SIGTERM, previous)
    exc = stopped.value
    assert (exc.step, exc.total, exc.exit_code) == (5, TOTAL, 143) and exc.checkpoint.name == "step-00000005"
    assert str(exc).startswith("stopped by SIGTERM after step 5 of 9; checkpoint ")
    assert latest_checkpoint(run).name == "step-00000005" and not (run / "adapter").exists()
    assert read_log(run)[-1]["step"] == 5  # flushed, and nothing past the checkpoint

    result = _train(stage1, run)
    ref_run, ref_result = reference
    got, want = _weights(run), _weights(ref_run)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert result.train_loss == ref_result.train_loss and result.val_loss == ref_result.val_loss
    assert _untimed(read_log(run)) == _untimed(read_log(ref_run))


@pytest.fixture(scope="module")
def stage2(tmp_path_factory):
    import _stage2_worker as W

    root = W.build(tmp_path_factory.mktemp("stage2"))
    return W.load(root)


def _train2(stage2, run_dir, on_step=None):
    from jomed_fast.retriever import QueryEncoder
    from jomed_fast.train.retriever import RetrieverTrainConfig, train_retriever

    reader, enc, retrieval, train, _val = stage2
    config = RetrieverTrainConfig(k=8, batch_size=4, epochs=2, refresh_every=2, lr=1e-2, warmup_steps=2)
    config = config.replace(tau_reader=0.1, tau_retriever=0.1, checkpoint_every=3, select="best_val_accuracy")
    qe = QueryEncoder(copy.deepcopy(enc), config.n_trainable, config.alpha)
    result = train_retriever(
        config, reader, "synthetic", qe, retrieval, train, None, run_dir, progress=False, on_step=on_step
    )
    return result, {n: p.detach().clone() for n, p in qe.learned.named_parameters() if p.requires_grad}


def test_sigterm_stops_stage2_and_its_resume_matches_an_uninterrupted_run(stage2, tmp_path):
    ref, ref_weights = _train2(stage2, tmp_path / "ref")
    rows = read_log(tmp_path / "ref")
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 4, 8]  # before training and after each epoch
    history = [ref.initial_eval, *(e["eval"] for e in ref.epochs)]
    assert [{k: r[k] for k in history[0]} for r in evals] == history
    assert [(r["step"], r["epoch"]) for r in rows if r["kind"] == "train"] == [(s, s / 4) for s in range(1, 9)]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    for epoch, record in enumerate(ref.epochs):  # the epoch records' mean loss is the lines' mean
        assert sum(losses[4 * epoch : 4 * epoch + 4]) / 4 == pytest.approx(record["train_loss"], rel=1e-12)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(StoppedBySignal) as stopped:
        _train2(stage2, tmp_path / "run", on_step=_terminate_at(2))
    assert stopped.value.step == 2 and latest_checkpoint(tmp_path / "run").name == "step-00000002"
    assert signal.getsignal(signal.SIGTERM) is before
    result, weights = _train2(stage2, tmp_path / "run")
    assert set(weights) == set(ref_weights) and all(torch.equal(weights[k], ref_weights[k]) for k in weights)
    assert result.selected == ref.selected and result.final_eval == ref.final_eval
    assert _untimed(read_log(tmp_path / "run")) == _untimed(rows)
    assert json.loads((tmp_path / "run" / "result.json").read_text())["steps"] == 8
