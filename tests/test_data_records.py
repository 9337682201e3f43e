"""JSONL sample / index-record loaders: round trips and every bad-data error (file + line + record)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from jomed_fast.data import (
    DataError,
    IndexRecord,
    Sample,
    atomic_write_jsonl,
    load_index_records,
    load_samples,
    save_png,
    write_index_records,
    write_samples,
)
from jomed_fast.tasks import get_task


def _img(seed: int, size: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _write_lines(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


@pytest.fixture()
def images(tmp_path):
    d = tmp_path / "imgs"
    for i in range(4):
        save_png(d / f"{i}.png", _img(i))
    return d


# ------------------------------------------------------------------------------------------------
# round trips
# ------------------------------------------------------------------------------------------------
def test_samples_round_trip(tmp_path):
    task = get_task("vindr_pcxr")
    samples = [
        Sample(
            id=f"s{i}",
            image_path=None,
            answer=task.format_answer({i, 14}),
            label=frozenset({i, 14}),
            question="Which diagnoses?" if i % 2 else None,
            image=_img(i),
            extra={"meta": {"k": i}},
        )
        for i in range(5)
    ]
    out = tmp_path / "out" / "train.jsonl"
    assert write_samples(samples, out, images_dir=tmp_path / "out" / "images") == 5
    assert json.loads(out.read_text().splitlines()[0])["image_path"] == "images/s0.png"  # relative
    back = load_samples(out, task, load_images=True)
    assert back.n_skipped == 0 and len(back) == 5
    for a, b in zip(samples, back):
        assert (a.id, a.answer, a.label, a.question, a.extra) == (b.id, b.answer, b.label, b.question, b.extra)
        assert np.array_equal(a.image, b.image) and b.image.dtype == np.uint8
        assert os.path.isabs(b.image_path)
    lazy = load_samples(out, "vindr_pcxr")  # images verified, not decoded
    assert lazy[2].image is None and np.array_equal(lazy[2].load_image(), samples[2].image)
    # written again from loaded records (paths, not arrays): same rows
    again = tmp_path / "out" / "again.jsonl"
    write_samples(back, again)
    assert again.read_text() == out.read_text()


def test_index_records_round_trip(tmp_path):
    recs = [
        IndexRecord(id=f"pmc-{i}", image_path=None, text=f"CT of the chest, case {i}", image=_img(10 + i))
        for i in range(3)
    ]
    out = tmp_path / "index.jsonl"
    write_index_records(recs, out, images_dir=tmp_path / "index_images")
    back = load_index_records(out, load_images=True)
    assert [r.id for r in back] == [r.id for r in recs] and [r.text for r in back] == [r.text for r in recs]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(recs, back))


def test_reference_format_variants(tmp_path, images):
    p = _write_lines(
        tmp_path / "mixed.jsonl",
        [
            {"image_path": str(images / "0.png"), "question": "Is it malignant?", "answer": "yes"},  # absolute
            "",  # blank lines are ignored
            {"image_path": "imgs/1.png", "answers": "No"},  # the reference's classification key
            {"id": 7, "image_path": "imgs/2.png", "answer": "YES ", "answers": ["Yes"]},  # both keys agree
        ],
    )
    got = load_samples(p, "breast")
    assert [s.id for s in got] == ["mixed:1", "mixed:3", "7"]  # "<stem>:<line>" when there is no id
    assert [s.answer for s in got] == ["Yes", "No", "Yes"] and [s.label for s in got] == [1, 0, 1]
    assert got[0].question == "Is it malignant?" and got[1].question is None
    # without a task the answer is kept as written
    raw = load_samples(p)
    assert [s.answer for s in raw] == ["yes", "No", "YES "] and raw[0].label is None
    # image_root for relative paths
    q = _write_lines(tmp_path / "sub" / "rel.jsonl", [{"image_path": "1.png", "answer": "3"}])
    assert load_samples(q, "derma", image_root=images)[0].image_path == str(images / "1.png")
    # derma answers may be ints; multi-label answers may be lists
    r = _write_lines(tmp_path / "ints.jsonl", [{"image_path": "imgs/0.png", "answer": 3}])
    assert load_samples(r, "derma")[0].label == 3
    m = _write_lines(tmp_path / "ml.jsonl", [{"image_path": "imgs/0.png", "answers": ["14", "2"]}])
    with pytest.raises(DataError, match="outside the label set"):
        load_samples(m, "brset")  # brset has 14 labels: 0..13
    s = load_samples(m, "vindr_pcxr")[0]
    assert s.label == frozenset({2, 14}) and s.answer == "2, 14"
    # open VQA: no label set, answer kept
    o = _write_lines(
        tmp_path / "open.jsonl", [{"image_path": "imgs/0.png", "question": "Where?", "answer": "left lung"}]
    )
    assert load_samples(o, "slake_open")[0].answer == "left lung"


# ------------------------------------------------------------------------------------------------
# bad data: each error names the file, the line and the record
# ------------------------------------------------------------------------------------------------
GOOD = {"id": "ok", "image_path": "imgs/0.png", "answer": "Yes"}


def _expect(path: Path, line: int, reason: str, record=None, loader=load_samples, **kw):
    with pytest.raises(DataError) as e:
        loader(path, **kw)
    err = e.value
    assert err.path == str(path) and err.line == line and err.record == record
    assert f"{path}:{line}: " in str(err) and reason in str(err)
    if record is not None:
        assert repr(record) in str(err)
    return err


@pytest.mark.parametrize(
    "bad, reason, record",
    [
        ('{"id": "a", "image_path": "imgs/0.png", "answer": "Yes"', "malformed JSON", None),
        ("not json at all", "malformed JSON", None),
        ('["a", "list"]', "expected a JSON object, got list", None),
        ({"id": "b", "answer": "Yes"}, "missing 'image_path'", "b"),
        ({"id": "c", "image_path": 5, "answer": "Yes"}, "'image_path' must be a string", "c"),
        ({"id": "d", "image_path": "imgs/0.png"}, "missing 'answer' (or 'answers')", "d"),
        ({"id": "e", "image_path": "imgs/0.png", "answer": {"x": 1}}, "'answer' must be a string or a list", "e"),
        (
            {"id": "f", "image_path": "imgs/0.png", "answer": "Maybe"},
            "answer 'Maybe' is outside the label set of task 'breast'",
            "f",
        ),
        ({"id": "g", "image_path": "imgs/0.png", "answer": "Yes", "answers": "No"}, "disagree", "g"),
        ({"id": "h", "image_path": "imgs/missing.png", "answer": "No"}, "missing image 'imgs/missing.png'", "h"),
        ({"id": "i", "image_path": "not_an_image.png", "answer": "No"}, "unreadable image 'not_an_image.png'", "i"),
        ({"id": "ok", "image_path": "imgs/1.png", "answer": "No"}, "duplicate id (first at line 1)", "ok"),
        ({"id": True, "image_path": "imgs/1.png", "answer": "No"}, "'id' must be a string", None),
        ({"id": "j", "image_path": "imgs/1.png", "question": 3, "answer": "No"}, "'question' must be a string", "j"),
    ],
)
def test_sample_errors_name_file_line_and_record(tmp_path, images, bad, reason, record):
    (tmp_path / "not_an_image.png").write_bytes(b"this is not a PNG file")
    p = _write_lines(tmp_path / "bad.jsonl", [GOOD, bad, GOOD | {"id": "later"}])
    _expect(p, 2, reason, record, task="breast")
    # skip_bad: skipped and counted instead
    got = load_samples(p, "breast", skip_bad=True)
    assert [s.id for s in got] == ["ok", "later"] and got.n_skipped == 1
    assert got.skipped[0].line == 2 and reason in str(got.skipped[0])


def test_truncated_image_needs_decode(tmp_path, images):
    data = (images / "3.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    p = _write_lines(tmp_path / "t.jsonl", [{"id": "t", "image_path": "trunc.png", "answer": "No"}])
    assert len(load_samples(p, "breast", verify_images="open")) == 1  # the header is fine
    _expect(p, 1, "unreadable image 'trunc.png'", "t", task="breast", verify_images="decode")
    _expect(p, 1, "unreadable image", "t", task="breast", load_images=True)
    assert load_samples(p, "breast", verify_images="none")[0].image is None
    with pytest.raises(ValueError, match="verify_images"):
        load_samples(p, "breast", verify_images="maybe")


def test_index_record_errors(tmp_path, images):
    good = {"id": "r0", "image_path": "imgs/0.png", "text": "Chest CT."}
    cases = [
        ({"image_path": "imgs/0.png", "text": "x"}, "missing 'id'", None),
        ({"id": "r1", "image_path": "imgs/0.png"}, "missing 'text'", "r1"),
        ({"id": "r2", "image_path": "imgs/0.png", "text": ["x"]}, "'text' must be a string", "r2"),
        ({"id": "r3", "image_path": "imgs/nope.png", "text": "x"}, "missing image", "r3"),
        ({"id": "r0", "image_path": "imgs/1.png", "text": "x"}, "duplicate id", "r0"),
        ("{broken", "malformed JSON", None),
    ]
    for bad, reason, record in cases:
        p = _write_lines(tmp_path / "index.jsonl", [good, bad])
        _expect(p, 2, reason, record, loader=load_index_records)


def test_skip_bad_counts_and_warns(tmp_path, images, caplog):
    lines = [
        GOOD,
        "{oops",
        {"id": "x1", "image_path": "imgs/none.png", "answer": "No"},
        {"id": "x2", "image_path": "imgs/1.png", "answer": "2"},
        "[]",
        {"id": "good2", "image_path": "imgs/2.png", "answers": ["no"]},
        "{also bad",
    ]
    p = _write_lines(tmp_path / "many.jsonl", lines)
    with pytest.raises(DataError, match=r"many\.jsonl:2: malformed JSON"):
        load_samples(p, "breast")
    with caplog.at_level(logging.WARNING, logger="jomed_fast.data.records"):
        got = load_samples(p, "breast", skip_bad=True)
    assert [s.id for s in got] == ["ok", "good2"]
    assert got.n_skipped == 5 and [e.line for e in got.skipped] == [2, 3, 4, 5, 7]
    assert "skipped 5 bad sample line(s) of 7" in caplog.text and "2 x malformed JSON" in caplog.text


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_samples(tmp_path / "nope.jsonl")
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"image_path": "a.png", "answer": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:1: not UTF-8"):
        load_samples(p)


def test_atomic_jsonl_write(tmp_path):
    p = tmp_path / "rows.jsonl"
    atomic_write_jsonl(p, [{"a": 1}])
    with pytest.raises(TypeError):
        atomic_write_jsonl(p, [{"a": 2}, {"b": object()}])  # fails while serialising
    assert p.read_text() == '{"a": 1}\n'  # the old file is intact
    assert sorted(os.listdir(tmp_path)) == ["rows.jsonl"]  # no temporary file left behind
    with pytest.raises(ValueError, match="no image_path and no in-memory image"):
        write_samples([Sample(id="z", image_path=None, answer="1")], tmp_path / "z.jsonl")
