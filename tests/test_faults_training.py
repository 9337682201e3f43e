"""Training runs resume only when every input that decides the result matches (content, not paths),
through the command line: another ``--train`` file, a dropped ``--index``, another reader or adapter,
other query images are each refused with one line naming the input (exit 2) and the run directory is
left as it was; a change that cannot alter the result (the progress bar, the checkpoint cadence)
resumes. The score cache is keyed by content: reused after the reader or the records changed it
serves no stale score (every value equals a fresh run's), and a damaged frame in its middle loses
only itself, reported on stderr. A NaN loss is one line and exit 2, naming the step and the last
good checkpoint.
"""

import copy
import dataclasses
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _faults import build_index, run, workspace
from safetensors.torch import load_file

from jomed_fast.candidate_retrieval import Retrieval
from jomed_fast.cli import main
from jomed_fast.index import Index
from jomed_fast.readers import tiny
from jomed_fast.retriever import QueryEncoder
from jomed_fast.train import reader_loss
from jomed_fast.train import retriever as stage2
from jomed_fast.train.checkpoint import latest_checkpoint
from jomed_fast.train.score_cache import FILE_MAGIC, CacheDamageWarning, ScoreCache

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    data = workspace(root, n_train=4, n_val=4, n_test=0, index_size=40)
    readers = {"a": tiny.build("qwen2_vl", root / "reader_a"), "b": tiny.build("qwen2_vl", root / "reader_b", seed=1)}
    build_index(root, data)
    return root, data, readers


def _index_args(root, data):
    return ["--index", root / "ix", "--index-records", data / "index.jsonl", "--encoder", root / "encoder"]


def _stage1(files, run_dir, *extra, train=None, index=True):
    root, data, readers = files
    return [
        "train-reader",
        "--reader",
        readers["a"],
        "--train",
        train or data / "train.jsonl",
        "--val",
        data / "val.jsonl",
        *(_index_args(root, data) if index else []),
        "--run-dir",
        run_dir,
        "--max-steps",
        2,
        "--batch-size",
        2,
        "--k-text",
        1,
        "--k-image",
        1,
        "--save-every",
        1,
        "--no-gradient-checkpointing",
        "--no-progress",
        *extra,
    ]


def _stage2(files, run_dir, reader="a", *extra, train=None, adapter=None):
    root, data, readers = files
    return [
        "train-retriever",
        "--reader",
        readers[reader],
        *(["--adapter", adapter] if adapter else []),
        "--train",
        train or data / "train.jsonl",
        "--val",
        data / "val.jsonl",
        *_index_args(root, data),
        "--run-dir",
        run_dir,
        "--heads",
        "text",
        "--k",
        4,
        "--max-steps",
        2,
        "--batch-size",
        2,
        "--checkpoint-every",
        1,
        "--no-progress",
        *extra,
    ]


def _snapshot(run_dir: Path) -> dict:
    """What a refused resume must leave as it was: identity, newest checkpoint, result."""
    ckpt = latest_checkpoint(run_dir)
    return {
        "identity": (run_dir / "identity.json").read_bytes(),
        "latest": ckpt.name,
        "weights": (ckpt / "weights.safetensors").read_bytes(),
        "result": (run_dir / "result.json").read_bytes(),
    }


def _error(code: int, err: str) -> str:
    """The one error line of a failed command (stderr may also hold the model loader's progress bars)."""
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _refused(code: int, err: str, *names: str) -> None:
    line = _error(code, err)
    changed = line.split("(")[-1].split(" changed")[0]
    assert "was made from other inputs" in line and changed.split(", ") == list(names), line


def _moved(src: Path, dest: Path, swap: bool = False) -> Path:
    """``src``'s samples written at ``dest`` (absolute image paths); ``swap``: the same ids and
    answers with the first two images exchanged."""
    rows = [json.loads(line) for line in src.read_text().splitlines()]
    if swap:
        rows[0]["image_path"], rows[1]["image_path"] = rows[1]["image_path"], rows[0]["image_path"]
    for r in rows:
        r["image_path"] = str(src.parent / r["image_path"])
    dest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dest


# ------------------------------------------------------------------------------------------ stage 1
@pytest.fixture(scope="module")
def stage1_run(files, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("s1") / "run"
    assert main([str(a) for a in _stage1(files, run_dir)]) == 0
    return run_dir


def test_stage1_refuses_another_train_file_and_a_dropped_index(files, stage1_run, capsys, tmp_path):
    _root, data, _ = files
    before = _snapshot(stage1_run)
    fewer = _moved(data / "train.jsonl", tmp_path / "fewer.jsonl")
    fewer.write_text("".join(fewer.read_text().splitlines(keepends=True)[:-1]))
    _refused(*run(_stage1(files, stage1_run, train=fewer), capsys)[::2], "train")
    swapped = _moved(data / "train.jsonl", tmp_path / "swapped.jsonl", swap=True)
    _refused(*run(_stage1(files, stage1_run, train=swapped), capsys)[::2], "train")
    # reader only is an input value: dropping --index does not turn the RAG adapter into a reader-only one
    _refused(*run(_stage1(files, stage1_run, index=False), capsys)[::2], "encoder", "exclusion", "index")
    _refused(*run(_stage1(files, stage1_run, "--lr", 1e-3, "--seed", 1), capsys)[::2], "config.lr", "config.seed")
    assert _snapshot(stage1_run) == before


def test_stage1_resumes_when_only_harmless_options_change(files, stage1_run, capsys):
    before = json.loads((stage1_run / "result.json").read_text())
    # the same samples from another file (content, not paths), a progress bar, another checkpoint cadence
    moved = _moved(files[1] / "train.jsonl", stage1_run.parent / "moved.jsonl")
    code, out, err = run(_stage1(files, stage1_run, "--progress", "--save-every", 2, "--keep", 3, train=moved), capsys)
    assert code == 0, err
    after = json.loads((stage1_run / "result.json").read_text())
    assert json.loads(out)["steps"] == 2 and after["resumed_from"] is not None
    assert after["train_loss"] == before["train_loss"] and after["val_loss"] == before["val_loss"]


def test_stage1_nan_loss_is_one_line_naming_the_step_and_checkpoint(files, capsys, monkeypatch, tmp_path):
    real, calls = reader_loss.answer_nll, []

    def poisoned(reader, inputs):
        nll, n = real(reader, inputs)
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 2:  # the second step's loss
                return nll * float("nan"), n
        return nll, n

    monkeypatch.setattr(reader_loss, "answer_nll", poisoned)
    line = _error(*run(_stage1(files, tmp_path / "run", "--k-text", 0), capsys)[::2])
    assert "got nan at step 2" in line and "the last good checkpoint is " in line and "step-00000001" in line
    assert latest_checkpoint(tmp_path / "run").name == "step-00000001"


# ------------------------------------------------------------------------------------------ stage 2
@pytest.fixture(scope="module")
def stage2_run(files, stage1_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("s2")
    cache = root / "shared_cache.bin"
    args = _stage2(files, root / "run", "a", "--cache-path", cache, adapter=stage1_run / "adapter")
    assert main([str(a) for a in args]) == 0
    return root / "run", cache, stage1_run / "adapter"


def test_stage2_refuses_another_reader_adapter_or_query_images(files, stage2_run, capsys, tmp_path):
    run_dir, cache, adapter = stage2_run
    before = _snapshot(run_dir / "text")
    _refused(*run(_stage2(files, run_dir, "a", "--cache-path", cache), capsys)[::2], "reader")  # no adapter
    _refused(*run(_stage2(files, run_dir, "b", "--cache-path", cache, adapter=adapter), capsys)[::2], "reader")
    swapped = _moved(files[1] / "train.jsonl", tmp_path / "swapped.jsonl", swap=True)
    _refused(
        *run(_stage2(files, run_dir, "a", "--cache-path", cache, train=swapped, adapter=adapter), capsys)[::2], "train"
    )
    assert _snapshot(run_dir / "text") == before
    # what cannot change the result may: the progress bar, the checkpoint cadence
    code, _out, err = run(
        _stage2(files, run_dir, "a", "--cache-path", cache, "--progress", "--checkpoint-every", 2, adapter=adapter),
        capsys,
    )
    assert code == 0, err
    assert json.loads((run_dir / "text" / "result.json").read_text())["steps"] == 2


def _rows(path: Path) -> dict:
    with ScoreCache(path) as c:
        return {k: c.get(*k).tobytes() for k in c.keys()}  # noqa: SIM118 - ScoreCache is not iterable


def test_a_reused_cache_serves_no_score_of_another_reader(files, stage2_run, capsys, tmp_path):
    run_dir, cache, _adapter = stage2_run
    kept = _rows(cache)
    # reader b with the cache reader a filled, and reader b with a cache of its own
    assert run(_stage2(files, tmp_path / "shared", "b", "--cache-path", cache), capsys)[0] == 0
    assert run(_stage2(files, tmp_path / "fresh", "b", "--cache-path", tmp_path / "own.bin"), capsys)[0] == 0
    shared = json.loads((tmp_path / "shared" / "text" / "result.json").read_text())
    fresh = json.loads((tmp_path / "fresh" / "text" / "result.json").read_text())
    assert shared["cache"]["misses"] == fresh["cache"]["misses"] > 0
    assert shared["cache"]["hits"] == fresh["cache"]["hits"]
    assert (
        shared["final_eval"] == fresh["final_eval"]
        and shared["epochs"][0]["train_loss"] == fresh["epochs"][0]["train_loss"]
    )
    wa = load_file(str(tmp_path / "shared" / "query_encoder" / "text" / "model.safetensors"))
    wb = load_file(str(tmp_path / "fresh" / "query_encoder" / "text" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wb)
    # reader b's rows in the shared file are exactly its own cache's; reader a's are all still there
    now, own = _rows(cache), _rows(tmp_path / "own.bin")
    assert {k: v for k, v in now.items() if k not in kept} == own
    assert all(now[k] == v for k, v in kept.items())


def test_a_reused_cache_rescores_records_and_queries_whose_content_changed(tmp_path):
    import _stage2_worker as W

    root = W.build(tmp_path / "w")
    reader, enc, retrieval, train, _val = W.load(root)
    cfg = stage2.RetrieverTrainConfig(
        head="image",
        k=8,
        batch_size=4,
        epochs=1,
        refresh_every=None,
        alpha=None,
        lr=1e-2,
        warmup_steps=0,
        eval_each_epoch=False,
    )

    def train_with(retrieval_, queries, cache, run):
        qe = QueryEncoder(copy.deepcopy(enc), cfg.n_trainable, cfg.alpha)
        res = stage2.train_retriever(
            cfg.replace(cache_path=str(cache)),
            reader,
            "synthetic",
            qe,
            retrieval_,
            queries,
            None,
            tmp_path / run,
            progress=False,
        )
        return res, {n: p.detach().clone() for n, p in qe.learned.named_parameters()}

    def same_as_fresh(retrieval_, queries, name):
        reused, w_reused = train_with(retrieval_, queries, tmp_path / "c.bin", name)
        fresh, w_fresh = train_with(retrieval_, queries, tmp_path / f"{name}.bin", f"{name}-fresh")
        assert reused.cache["misses"] == fresh.cache["misses"] == first.cache["misses"] > 0, name
        assert reused.cache["hits"] == fresh.cache["hits"], name
        assert all(torch.equal(w_reused[n], w_fresh[n]) for n in w_fresh), name
        assert reused.epochs[0]["train_loss"] == fresh.epochs[0]["train_loss"], name

    first, _ = train_with(retrieval, train, tmp_path / "c.bin", "first")
    # the same ids, other captions (an index rebuilt from them; the image head brings the same
    # records): nothing stored for the old captions may be served
    revised = [
        type(r)(id=r.id, image_path=r.image_path, text=r.text + " (revised)", image=r.image) for r in retrieval.records
    ]
    ix = Index.build(revised, enc, tmp_path / "ix2", batch_size=96, chunk_size=96, progress=False)
    same_as_fresh(Retrieval(ix, revised), train, "records")
    # the same query ids and answers, other images (each one flipped upside down)
    flipped = [dataclasses.replace(s, image=np.ascontiguousarray(s.load_image()[::-1])) for s in train]
    same_as_fresh(retrieval, flipped, "queries")


def test_stage2_nan_loss_is_one_line(files, capsys, monkeypatch, tmp_path):
    real = stage2.distillation_loss
    monkeypatch.setattr(stage2, "distillation_loss", lambda s, r, cfg: real(s, r, cfg) * float("nan"))
    line = _error(*run(_stage2(files, tmp_path / "run", "a"), capsys)[::2])
    assert "got nan at step 1" in line and "no checkpoint was written yet" in line


# ------------------------------------------------------------------------------------------ cache file
NS = ("f" * 64, "synthetic", "shared_query|first_token|norm")


def _frames(path: Path) -> list[tuple[int, int]]:
    data, off, out = path.read_bytes(), len(FILE_MAGIC), []
    while off < len(data):
        length = int.from_bytes(data[off + 4 : off + 8], "little")
        out.append((off, off + 12 + length))
        off += 12 + length
    return out


def test_a_damaged_frame_in_the_middle_loses_only_itself_and_is_reported(tmp_path):
    path = tmp_path / "cache.bin"
    rows = {}
    with ScoreCache(path) as cache:
        for q in range(18):  # 18 batches, one frame each
            pairs = [(f"q{q}", f"c{c}") for c in range(3)]
            r = np.random.RandomState(q).randn(3, 5).astype(np.float32)
            cache.append(NS, pairs, r, seconds=0.1)
            rows.update({p: r[i].tobytes() for i, p in enumerate(pairs)})
    spans = _frames(path)
    assert len(spans) == 18
    damaged = bytearray(path.read_bytes())
    start, end = spans[8]
    damaged[(start + end) // 2] ^= 0x40  # one flipped bit inside frame 9's payload
    path.write_bytes(bytes(damaged))

    # reported on stderr (a fresh interpreter: warnings as the command line shows them)
    code = (
        "import sys; from jomed_fast.train.score_cache import ScoreCache; "
        f"c = ScoreCache({str(path)!r}); print(len(c), c.stats.dropped_frames, c.stats.dropped_bytes)"
    )
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert got.stdout.split() == ["51", "1", str(end - start)]
    assert "CacheDamageWarning" in got.stderr and str(path) in got.stderr
    assert f"dropped 1 damaged frame(s), {end - start} bytes" in got.stderr

    # the file was rewritten without the damaged frame: every other frame is kept, bitwise
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = ScoreCache(path)
    assert not [w for w in caught if issubclass(w.category, CacheDamageWarning)]
    with cache:
        assert len(cache) == 17 * 3 and cache.stats.dropped_frames == 0 and cache.stats.truncated_bytes == 0
        for (qid, cid), row in rows.items():
            stored = cache.get(NS, qid, cid)
            assert (stored is None) == (qid == "q8"), qid
            assert stored is None or stored.tobytes() == row
        cache.append(NS, [("q8", "c0")], np.zeros((1, 5), np.float32), seconds=0.0)  # appends still work
    assert len(_frames(path)) == 18
