"""Predictions, evaluation and analysis under faults: a resume only from the same inputs (reader +
adapter, index, query encoder, samples' content, result-changing options), outputs that never
destroy inputs, one writer per predictions file, per-query random retrieval, checks before any model
loads, and readers of predictions files that name file:line. Through the CLI (exit code 2, one line
on stderr) and the API, checking that no input changed (sha256) and no prediction was lost."""

import dataclasses
import fcntl
import json
import os
import threading

import pytest
import torch
from _faults import (
    N_INDEX,
    N_TEST,
    assert_same_predictions,
    base_args,
    inputs_digest,
    one_line_error,
    run,
    sha,
)

from jomed_fast.identity import IdentityMismatch
from jomed_fast.infer import InferConfig, predict, read_predictions
from jomed_fast.readers import load_reader

pytestmark = pytest.mark.usefixtures("one_thread")


def copy_run(full_run, tmp_path):
    src, data = full_run
    dst = tmp_path / "p.jsonl"
    dst.write_bytes(data)
    (tmp_path / "p.jsonl.meta.json").write_bytes((src.parent / "p.jsonl.meta.json").read_bytes())
    return dst


# ------------------------------------------------------------------------------------- identity
def test_a_rerun_without_the_adapter_is_refused_naming_the_reader(files, full_run, tmp_path, capsys):
    root, _data, reader_dir = files
    reader = load_reader(reader_dir, device="cpu")
    reader.add_lora()
    torch.manual_seed(1)
    for p in reader.lora_parameters().values():
        p.data.normal_(0, 0.5)  # an adapter that changes the scores
    reader.save_adapter(tmp_path / "adapter")
    out = tmp_path / "p.jsonl"
    code, _o, err = run(base_args(files, out, "--adapter", tmp_path / "adapter"), capsys)
    assert code == 0, err
    kept = out.read_bytes()
    assert kept != full_run[1]  # the adapter changed the predictions
    code, _o, err = run(base_args(files, out), capsys)
    one_line_error(code, err, str(out), "(reader changed)")
    assert out.read_bytes() == kept


def test_a_rerun_without_the_query_encoder_is_refused(files, tmp_path, capsys):
    from jomed_fast.retriever import HeadEncoders, load_encoder

    root, _data, _reader = files
    heads = HeadEncoders.untrained(load_encoder(root / "encoder"), alpha=0.5)
    torch.manual_seed(2)
    for p in heads.text.learned.parameters():
        p.data.add_(0.3 * torch.randn_like(p))
    heads.save(tmp_path / "qe")
    out = tmp_path / "p.jsonl"
    code, _o, err = run(base_args(files, out, "--query-encoder", tmp_path / "qe"), capsys)
    assert code == 0, err
    kept = out.read_bytes()
    code, _o, err = run(base_args(files, out, "--query-encoder", tmp_path / "qe"), capsys)
    assert code == 0 and out.read_bytes() == kept, err  # the same inputs: resumed, nothing to do
    code, _o, err = run(base_args(files, out), capsys)
    one_line_error(code, err, "(encoder, query_encoder changed)")
    assert out.read_bytes() == kept


def test_relabelled_samples_with_the_same_ids_are_refused(files, full_run, tmp_path, capsys):
    _root, data, _reader = files
    out = copy_run(full_run, tmp_path)
    from jomed_fast.tasks import get_task

    labels = get_task("synthetic").labels
    rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    for r in rows:
        r["image_path"] = str(data / r["image_path"])
    rows[0]["answer"] = next(a for a in labels if a != rows[0]["answer"])  # same id, another label
    relabelled = tmp_path / "relabelled.jsonl"
    relabelled.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = base_args(files, out)
    argv[argv.index("--samples") + 1] = relabelled
    code, _o, err = run(argv, capsys)
    one_line_error(code, err, "(samples changed)")
    assert out.read_bytes() == full_run[1]


def test_a_harmless_option_resumes_and_a_changed_one_names_itself(files, full_run, tmp_path, capsys):
    out = copy_run(full_run, tmp_path)
    lines = out.read_bytes().split(b"\n")
    out.write_bytes(b"\n".join(lines[:3]) + b"\n" + lines[3][:30])  # 3 records and a torn fourth
    code, _o, err = run(base_args(files, out, "--batch-size", 3), capsys)
    assert code == 0, err
    resumed = out.read_bytes()
    assert resumed.startswith(b"\n".join(lines[:3]) + b"\n")  # the 3 finished records kept as they were
    assert_same_predictions(read_predictions(out), read_predictions(full_run[0]))
    code, _o, err = run(base_args(files, out, "--k-text", 2), capsys)
    one_line_error(code, err, "(option.k_text changed)")
    assert out.read_bytes() == resumed


def test_the_identity_names_every_input_through_the_api(files, tmp_path):
    from jomed_fast.data import load_samples
    from jomed_fast.infer import predict_identity
    from jomed_fast.scoring import CandidateScorer

    _root, data, reader_dir = files
    reader = load_reader(reader_dir, device="cpu")
    samples = load_samples(data / "test.jsonl", "synthetic")
    scorer = CandidateScorer(reader, "synthetic", "paper")
    ident = predict_identity(scorer, samples, config=InferConfig(retrieval="none", batch_size=1))
    assert ident == predict_identity(scorer, samples, config=InferConfig(retrieval="none", batch_size=7))
    assert (
        "index" not in ident
        and "encoder" not in ident
        and ident["samples"] != predict_identity(scorer, samples[:-1], config=InferConfig(retrieval="none"))["samples"]
    )
    out = tmp_path / "p.jsonl"
    predict(scorer, samples[:2], config=InferConfig(retrieval="none"), out_path=out, progress=False)
    with pytest.raises(IdentityMismatch, match=r"\(samples changed\)"):
        predict(scorer, samples[:3], config=InferConfig(retrieval="none"), out_path=out, progress=False)
    reworded = dataclasses.replace(scorer.task, question=scorer.task.question + " Answer briefly.")  # same name
    with pytest.raises(IdentityMismatch, match=r"\(task changed\)"):
        predict(
            CandidateScorer(reader, reworded, "paper"),
            samples[:2],
            config=InferConfig(retrieval="none"),
            out_path=out,
            progress=False,
        )
    reader.add_lora()  # a fresh adapter is in the fingerprint even when it does not change scores yet
    with pytest.raises(IdentityMismatch, match=r"\(reader changed\)"):
        predict(scorer, samples[:2], config=InferConfig(retrieval="none"), out_path=out, progress=False)
    assert len(read_predictions(out)) == 2


# ------------------------------------------------------------------------------------- outputs vs inputs
@pytest.mark.parametrize("which", ["samples", "index_records", "inside_index"])
def test_an_out_that_is_an_input_is_refused_before_anything_is_written(files, which, capsys):
    root, data, _reader = files
    before = inputs_digest(files)
    out = {
        "samples": data / "test.jsonl",
        "index_records": data / "index.jsonl",
        "inside_index": root / "ix" / "p.jsonl",
    }[which]
    code, _o, err = run(base_args(files, out), capsys)
    one_line_error(code, err, "--out", str(out), "destroy an input")
    assert inputs_digest(files) == before
    assert not os.path.exists(f"{out}.meta.json") and not os.path.exists(f"{out}.lock")
    assert not (root / "ix" / "p.jsonl").exists()


def test_an_out_hard_linked_to_the_samples_is_refused(files, tmp_path, capsys):
    _root, data, _reader = files
    link = tmp_path / "link.jsonl"
    os.link(data / "test.jsonl", link)
    code, _o, err = run(base_args(files, link), capsys)
    one_line_error(code, err, "is the input --samples")
    assert sha(link) == sha(data / "test.jsonl")


def test_a_lost_sidecar_keeps_the_finished_predictions(files, full_run, tmp_path, capsys):
    out = copy_run(full_run, tmp_path)
    (tmp_path / "p.jsonl.meta.json").unlink()
    code, _o, err = run(base_args(files, out), capsys)
    one_line_error(code, err, str(out), "without its sidecar", "left untouched")
    assert out.read_bytes() == full_run[1] and len(read_predictions(out)) == N_TEST
    foreign = tmp_path / "notes.txt"  # another program's file
    foreign.write_text("my notes\n")
    code, _o, err = run(base_args(files, foreign), capsys)
    one_line_error(code, err, "without its sidecar")
    assert foreign.read_text() == "my notes\n"


def test_evaluate_never_writes_over_its_predictions(full_run, tmp_path, capsys):
    out = copy_run(full_run, tmp_path)
    for target in (out, tmp_path / "p.jsonl.meta.json"):
        before = sha(target)
        code, _o, err = run(["evaluate", "--predictions", out, "--out", target], capsys)
        one_line_error(code, err, "--out", "destroy an input")
        assert sha(target) == before
    code, printed, err = run(["evaluate", "--predictions", out, "--out", tmp_path / "m.json"], capsys)
    assert code == 0 and json.loads(printed)["fused"]["n"] == N_TEST


# ------------------------------------------------------------------------------------- one writer
def test_a_second_run_on_a_locked_out_is_refused_naming_the_lock(files, full_run, tmp_path, capsys):
    out = copy_run(full_run, tmp_path)
    fd = os.open(f"{out}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        code, _o, err = run(base_args(files, out), capsys)
    finally:
        os.close(fd)
    one_line_error(code, err, f"{out}.lock", "another run")
    assert out.read_bytes() == full_run[1]


def test_two_concurrent_runs_write_each_query_once(files, tmp_path):
    from jomed_fast.data import load_samples
    from jomed_fast.scoring import CandidateScorer

    _root, data, reader_dir = files
    reader = load_reader(reader_dir, device="cpu")
    samples = load_samples(data / "test.jsonl", "synthetic")
    scorer = CandidateScorer(reader, "synthetic", "paper")
    config = InferConfig(retrieval="none", batch_size=2)
    inside, release = threading.Event(), threading.Event()
    real = scorer.score

    def slow(*args):
        inside.set()
        assert release.wait(30)
        return real(*args)

    scorer.score = slow
    out = tmp_path / "p.jsonl"
    first = threading.Thread(
        target=predict,
        args=(scorer, samples),
        daemon=True,
        kwargs={"config": config, "out_path": out, "progress": False},
    )
    first.start()
    assert inside.wait(30)  # the first run holds the file and is scoring
    try:
        with pytest.raises(ValueError, match=r"p\.jsonl\.lock: held by another run"):
            predict(CandidateScorer(reader, "synthetic", "paper"), samples, config=config, out_path=out, progress=False)
    finally:
        release.set()
        first.join(60)
    ids = [json.loads(line)["query_id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == sorted(s.id for s in samples)  # each once, none lost


# ------------------------------------------------------------------------------------- random retrieval
def test_random_retrieval_draws_the_same_candidates_after_a_resume(files, tmp_path, capsys):
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    assert run(base_args(files, full, "--retrieval", "random", "--seed", 5), capsys)[0] == 0
    assert run(base_args(files, part, "--retrieval", "random", "--seed", 5), capsys)[0] == 0
    lines = part.read_bytes().split(b"\n")
    part.write_bytes(b"\n".join(lines[:3]) + b"\n")  # interrupted after 3 queries
    code, _o, err = run(base_args(files, part, "--retrieval", "random", "--seed", 5, "--batch-size", 4), capsys)
    assert code == 0, err
    assert_same_predictions(read_predictions(part), read_predictions(full))
    # a query's draw depends on (seed, query id) alone, and another seed draws others
    other = tmp_path / "other.jsonl"
    assert run(base_args(files, other, "--retrieval", "random", "--seed", 6), capsys)[0] == 0
    assert [[c.id for c in r.candidates] for r in read_predictions(other)] != [
        [c.id for c in r.candidates] for r in read_predictions(full)
    ]


def test_random_draws_do_not_depend_on_the_order_of_the_queries(files):
    from jomed_fast.candidate_retrieval import Retrieval
    from jomed_fast.data import load_index_records, load_samples
    from jomed_fast.index import Index
    from jomed_fast.infer.predict import _candidates

    root, data, _reader = files
    retrieval = Retrieval(Index.open(root / "ix"), load_index_records(data / "index.jsonl"))
    samples = load_samples(data / "test.jsonl", "synthetic")
    config = InferConfig(retrieval="random", seed=3)
    ids = lambda batch: _candidates(config, retrieval, None, batch, [None] * len(batch))[3]  # noqa: E731
    together = ids(samples)
    assert [ids([s])[0] for s in reversed(samples)] == together[::-1]
    assert len({tuple(row) for row in together}) > 1


# ------------------------------------------------------------------------------------- checks before loading
@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--k-text", N_INDEX + 1], f"k_text: expected at most the index's {N_INDEX} records"),
        (["--tau", "inf"], "tau: expected a finite number > 0"),
        (["--tau", "nan"], "tau: expected a finite number > 0"),
        (["--threshold", 0], "threshold: expected a number in (0, 1]"),
    ],
)
def test_a_bad_option_fails_before_the_reader_loads_and_leaves_nothing(
    files, tmp_path, capsys, monkeypatch, extra, needle
):
    import jomed_fast.cli.inference as inference

    def no_reader(values):
        raise AssertionError("the reader was loaded before the options were checked")

    monkeypatch.setattr(inference, "load_reader_from", no_reader)
    out = tmp_path / "p.jsonl"
    code, _o, err = run(base_args(files, out, *extra), capsys)
    one_line_error(code, err, needle)
    assert sorted(os.listdir(tmp_path)) == []
    monkeypatch.undo()
    code, _o, err = run(base_args(files, out), capsys)  # the corrected rerun
    assert code == 0, err
    assert len(read_predictions(out)) == N_TEST


def test_a_sidecar_over_an_empty_out_does_not_block_the_next_run(files, tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    out.write_text("")
    (tmp_path / "p.jsonl.meta.json").write_text(json.dumps({"format": "jomed-predictions-v2", "option.tau": 9.0}))
    code, _o, err = run(base_args(files, out), capsys)
    assert code == 0, err
    assert len(read_predictions(out)) == N_TEST


# ------------------------------------------------------------------------------------- reading predictions
def test_a_corrupt_or_repeated_line_names_file_and_line(files, full_run, tmp_path, capsys):
    out = copy_run(full_run, tmp_path)
    lines = out.read_text().splitlines(keepends=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(lines[:2]) + '{"query_id": "x", "gold"\n' + "".join(lines[2:]))
    code, _o, err = run(["evaluate", "--predictions", bad], capsys)
    one_line_error(code, err, f"{bad}:3: not a prediction record")
    not_a_record = tmp_path / "list.jsonl"
    not_a_record.write_text(lines[0] + "[1, 2]\n")
    code, _o, err = run(["evaluate", "--predictions", not_a_record], capsys)
    one_line_error(code, err, f"{not_a_record}:2: not a prediction record")
    # what two unlocked writers would leave: refused by evaluate and by a resume, naming the line
    out.write_text("".join(lines) + lines[1])
    qid = json.loads(lines[1])["query_id"]
    code, _o, err = run(["evaluate", "--predictions", out], capsys)
    one_line_error(code, err, f"{out}:{N_TEST + 1}: query id {qid!r} already on line 2")
    before = sha(out)
    code, _o, err = run(base_args(files, out), capsys)
    one_line_error(code, err, f"{out}:{N_TEST + 1}: query id {qid!r}")
    assert sha(out) == before


def test_analyze_refuses_other_query_sets_and_a_repeated_name(full_run, tmp_path, capsys):
    out = copy_run(full_run, tmp_path)
    lines = out.read_text().splitlines(keepends=True)
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(lines[:-1]))
    report = tmp_path / "report"
    code, _o, err = run(["analyze", "--system", f"a={out}", f"b={fewer}", "--out", report], capsys)
    missing = json.loads(lines[-1])["query_id"]
    one_line_error(code, err, "'b' covers other queries than 'a'", "1 missing", repr(missing))
    code, _o, err = run(["analyze", "--system", f"a={out}", f"a={fewer}", "--out", report], capsys)
    one_line_error(code, err, "--system: the name 'a' is given twice")
    twice = tmp_path / "twice.jsonl"
    twice.write_text("".join(lines) + lines[0])
    code, _o, err = run(["analyze", "--system", f"a={out}", f"b={twice}", "--out", report], capsys)
    one_line_error(code, err, f"{twice}:{N_TEST + 1}: query id")
    assert not report.exists()  # nothing written for a refused analysis
    code, _o, err = run(["analyze", "--system", f"a={out}", f"b={out}", "--out", out], capsys)
    one_line_error(code, err, "--out", "is a file")
    assert out.read_text() == "".join(lines)
    code, _o, err = run(["analyze", "--system", f"a={out}", "--out", report], capsys)
    assert code == 0, err


def test_analysis_api_refuses_systems_over_other_queries(full_run):
    from jomed_fast.analysis import check_same_queries, split_consistency, split_metrics
    from jomed_fast.eval import prediction_metrics

    recs = read_predictions(full_run[0])
    split = split_consistency(recs)
    assert check_same_queries({"a": recs, "b": list(reversed(recs))}, split) == {r.query_id for r in recs}
    with pytest.raises(ValueError, match="'b' covers other queries than 'a' \\(1 missing"):
        check_same_queries({"a": recs, "b": recs[1:]})
    with pytest.raises(ValueError, match=r"'b' covers other queries than 'the split' \(1 missing"):
        split_metrics({"a": recs, "b": recs[1:]}, split)
    with pytest.raises(ValueError, match="appears more than once"):
        split_metrics({"a": recs + recs[:1]}, split)
    with pytest.raises(ValueError, match="records: query id .* appears more than once"):
        prediction_metrics(recs + recs[:1])
