"""VQA-RAD / SLAKE / PathVQA JSON loaders: fixtures made here (tiny PNG/JPEG images + JSON files in
each release's layout), the closed/open and split conventions, the JSONL converter's round trip
through ``load_samples``, and every bad case (a DataError naming the file and the record)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jomed_fast.data import (
    DataError,
    is_closed_answer,
    load_pathvqa,
    load_samples,
    load_slake,
    load_vqa,
    load_vqa_rad,
    vqa_to_jsonl,
)
from jomed_fast.data.vqa import VQA_RAD_JSON


def _img(seed: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _save(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    Image.fromarray(_img(seed)).save(path, format=fmt)
    return path


def _json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------
# fixtures: one small release per dataset
# ------------------------------------------------------------------------------------------------
VQA_RAD_ROWS = [
    {
        "qid": 0,
        "image_name": "synpic1.jpg",
        "question": "Is there a fracture?",
        "answer": "Yes",
        "answer_type": "CLOSED",
        "phrase_type": "freeform",
    },
    {
        "qid": 1,
        "image_name": "synpic1.jpg",
        "question": "Which organ is shown?",
        "answer": "liver",
        "answer_type": "OPEN",
        "phrase_type": "para",
    },
    {
        "qid": 2,
        "image_name": "synpic2.png",
        "question": "Is the lesion on the left or right?",
        "answer": "left",
        "answer_type": "CLOSED",
        "phrase_type": "freeform",
    },  # CLOSED but not yes/no: open task
    {
        "qid": 3,
        "image_name": "synpic2.png",
        "question": "How many lesions?",
        "answer": 2,
        "answer_type": "OPEN",
        "phrase_type": "test_freeform",
    },
    {
        "qid": 4,
        "image_name": "synpic1.jpg",
        "question": "Is this normal?",
        "answer": " NO ",
        "answer_type": "CLOSED",
        "phrase_type": "test_para",
    },
]


@pytest.fixture()
def vqa_rad(tmp_path):
    root = tmp_path / "vqa_rad"
    _save(root / "VQA_RAD Image Folder" / "synpic1.jpg", 1)
    _save(root / "VQA_RAD Image Folder" / "synpic2.png", 2)
    _json(root / VQA_RAD_JSON, VQA_RAD_ROWS)
    return root


SLAKE_TRAIN = [
    {
        "img_id": 102,
        "img_name": "xmlab102/source.jpg",
        "question": "Does the picture contain liver?",
        "answer": "Yes",
        "q_lang": "en",
        "answer_type": "CLOSED",
        "qid": 11,
    },
    {
        "img_id": 102,
        "img_name": "xmlab102/source.jpg",
        "question": "图片中包含肝脏吗?",
        "answer": "是",
        "q_lang": "zh",
        "answer_type": "CLOSED",
        "qid": 12,
    },
    {
        "img_id": 7,
        "img_name": "xmlab7/source.jpg",
        "question": "What modality is used?",
        "answer": "CT",
        "q_lang": "en",
        "answer_type": "OPEN",
        "qid": 13,
    },
    {
        "img_id": 7,
        "img_name": "xmlab7/source.jpg",
        "question": "Is the lung healthy?",
        "answer": "no",
        "q_lang": "en",
        "answer_type": "CLOSED",
        "qid": 14,
    },
]


@pytest.fixture()
def slake(tmp_path):
    root = tmp_path / "Slake1.0"
    _save(root / "imgs" / "xmlab102" / "source.jpg", 3)
    _save(root / "imgs" / "xmlab7" / "source.jpg", 4)
    _json(root / "train.json", SLAKE_TRAIN)
    _json(root / "validate.json", [dict(SLAKE_TRAIN[0], qid=21), dict(SLAKE_TRAIN[2], qid=22)])
    _json(
        root / "test.json", [dict(SLAKE_TRAIN[2], qid=31), dict(SLAKE_TRAIN[1], qid=32), dict(SLAKE_TRAIN[3], qid=33)]
    )
    return root


def _pathvqa_rows(split: str):
    return [
        {"image": f"{split}_0000", "question": "Is there inflammation?", "answer": "yes"},
        {"image": f"{split}_0001", "question": "What does this image show?", "answer": "necrosis"},
        {"image": f"{split}_0000.jpg", "question": "Are the cells atypical?", "answer": "No"},
    ]


@pytest.fixture()
def pathvqa(tmp_path):
    """The converted official layout: ``<root>/<split>_qa.json`` + ``<root>/images/<split>/*.jpg``."""
    root = tmp_path / "pvqa"
    for j, split in enumerate(("train", "val", "test")):
        _save(root / "images" / split / f"{split}_0000.jpg", 10 + j)
        _save(root / "images" / split / f"{split}_0001.jpg", 20 + j)
        _json(root / f"{split}_qa.json", _pathvqa_rows(split))
    return root


# ------------------------------------------------------------------------------------------------
# parsing
# ------------------------------------------------------------------------------------------------
def test_is_closed_answer():
    assert is_closed_answer("Yes") and is_closed_answer(" no ") and is_closed_answer("YES.")
    assert not is_closed_answer("left") and not is_closed_answer("yes, left") and not is_closed_answer(2)


def test_vqa_rad_split_and_kinds(vqa_rad):
    closed = load_vqa_rad(vqa_rad, "train", "closed")
    assert [s.id for s in closed] == ["vqa_rad-00000"]
    s = closed[0]
    assert (s.question, s.answer, s.label) == ("Is there a fracture?", "yes", 1)
    assert s.extra["phrase_type"] == "freeform" and s.extra["qid"] == 0 and s.extra["answer_type"] == "CLOSED"
    assert Path(s.image_path).is_absolute() and Path(s.image_path).name == "synpic1.jpg"
    opened = load_vqa_rad(vqa_rad, "train", "open")
    assert [(s.id, s.answer, s.label) for s in opened] == [
        ("vqa_rad-00001", "liver", None),
        ("vqa_rad-00002", "left", None),
    ]
    test_all = load_vqa_rad(vqa_rad, "test", "all")  # phrase_type test_* -> test
    assert [(s.id, s.answer, s.label, s.extra["kind"]) for s in test_all] == [
        ("vqa_rad-00003", "2", None, "open"),
        ("vqa_rad-00004", "no", 0, "closed"),
    ]
    # the JSON file itself as root; images decode
    loaded = load_vqa_rad(vqa_rad / VQA_RAD_JSON, "test", "closed", load_images=True)
    assert loaded[0].image.shape == (8, 8, 3) and loaded[0].image.dtype == np.uint8
    png = load_vqa_rad(vqa_rad, "train", "open")[1].load_image()
    assert np.array_equal(png, _img(2))  # PNG is lossless
    assert load_vqa("vqa_rad", vqa_rad, "train", "closed")[0].id == "vqa_rad-00000"


def test_slake_english_only(slake):
    train = load_slake(slake, "train", "all")
    assert [s.id for s in train] == ["slake-11", "slake-13", "slake-14"]  # qid 12 is Chinese
    assert all(s.extra["kind"] == ("closed" if s.label is not None else "open") for s in train)
    assert [(s.answer, s.label) for s in train] == [("yes", 1), ("CT", None), ("no", 0)]
    assert Path(train[0].image_path) == slake / "imgs" / "xmlab102" / "source.jpg"
    assert [s.id for s in load_slake(slake, "train", "closed")] == ["slake-11", "slake-14"]
    assert [s.id for s in load_slake(slake, "val", "closed")] == ["slake-21"]  # alias of "validate"
    assert [s.id for s in load_slake(slake, "validate", "open")] == ["slake-22"]
    assert [s.question for s in load_slake(slake, "test", "open")] == ["What modality is used?"]
    img = load_slake(slake, "test", "open", load_images=True)[0].image
    assert img.shape == (8, 8, 3)


def test_pathvqa_layouts(pathvqa, tmp_path):
    train = load_pathvqa(pathvqa, "train", "all")
    assert [(s.id, s.answer, s.label) for s in train] == [
        ("pathvqa-train-00000", "yes", 1),
        ("pathvqa-train-00001", "necrosis", None),
        ("pathvqa-train-00002", "no", 0),
    ]
    assert Path(train[0].image_path) == pathvqa / "images" / "train" / "train_0000.jpg"  # suffix found
    assert len(load_pathvqa(pathvqa, "validate", "closed")) == 2  # alias of "val"
    # split folders: <root>/<split>/<split>.json with the images beside it
    folders = tmp_path / "folders"
    for split in ("train", "test"):
        _save(folders / split / f"{split}_0000.png", 1)
        _save(folders / split / f"{split}_0001.png", 2)
        _json(folders / split / f"{split}.json", _pathvqa_rows(split)[:2])
    t = load_pathvqa(folders, "test", "open", load_images=True)
    assert [s.answer for s in t] == ["necrosis"] and np.array_equal(t[0].image, _img(2))
    # one file with a split field (and own ids)
    single = tmp_path / "single"
    _save(single / "images" / "a.png", 5)
    rows = [
        {"id": "q1", "image": "a.png", "question": "Is it benign?", "answer": "yes", "split": "train"},
        {"id": "q2", "image": "a.png", "question": "Is it malignant?", "answer": "no", "split": "validation"},
        {"id": "q3", "image": "a.png", "question": "What stain?", "answer": "H&E", "split": "test"},
    ]
    _json(single / "qa.json", rows)
    assert [s.id for s in load_pathvqa(single, "val", "closed")] == ["pathvqa-q2"]
    assert [s.id for s in load_pathvqa(single / "qa.json", "test", "open")] == ["pathvqa-q3"]


# ------------------------------------------------------------------------------------------------
# conversion -> JSONL -> load_samples
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset", ["vqa_rad", "slake", "pathvqa"])
def test_to_jsonl_round_trip(dataset, request, tmp_path):
    root = request.getfixturevalue(dataset)
    out = tmp_path / "jsonl" / dataset
    written = vqa_to_jsonl(dataset, root, out)
    splits = {
        "vqa_rad": ("train", "test"),
        "slake": ("train", "validate", "test"),
        "pathvqa": ("train", "val", "test"),
    }[dataset]
    assert sorted(written) == sorted(f"{sp}_{k}" for sp in splits for k in ("closed", "open"))
    for key, path in written.items():
        sp, kind = key.rsplit("_", 1)
        assert path == out / f"{key}.jsonl"
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert all(list(r) == ["id", "image_path", "question", "answer"] for r in rows)
        assert all(not Path(r["image_path"]).is_absolute() for r in rows)
        task = f"{dataset}_{kind}"
        back = load_samples(path, task, verify_images="decode")
        want = load_vqa(dataset, root, sp, kind)
        assert back.n_skipped == 0
        assert [(s.id, s.question, s.answer, s.label, s.image_path) for s in back] == [
            (s.id, s.question, s.answer, s.label, s.image_path) for s in want
        ]


def test_to_jsonl_limit_and_arguments(vqa_rad, slake, tmp_path):
    w = vqa_to_jsonl("vqa_rad", vqa_rad, tmp_path / "o", splits=["train"], kinds=["all"], limit=2)
    assert list(w) == ["train_all"] and len(load_samples(w["train_all"])) == 2
    with pytest.raises(ValueError, match="dataset: expected one of"):
        vqa_to_jsonl("vqa-rad", vqa_rad, tmp_path / "o")
    with pytest.raises(ValueError, match="kinds: expected"):
        vqa_to_jsonl("vqa_rad", vqa_rad, tmp_path / "o", kinds=["yesno"])
    with pytest.raises(ValueError, match="split: expected one of"):
        load_vqa_rad(vqa_rad, "val")
    with pytest.raises(ValueError, match="kind: expected one of"):
        load_slake(slake, "train", "yesno")
    with pytest.raises(ValueError, match="verify_images"):
        load_slake(slake, "train", verify_images="full")
    # a split with no closed question is an error in the converter too
    _json(slake / "validate.json", [dict(SLAKE_TRAIN[0], qid=21)])  # closed only
    with pytest.raises(DataError, match=r"validate\.json: empty split: no open questions in split 'validate'"):
        vqa_to_jsonl("slake", slake, tmp_path / "s", splits=["val"], kinds=["open"])


# ------------------------------------------------------------------------------------------------
# bad data: DataError naming the file and the record; skip_bad counts
# ------------------------------------------------------------------------------------------------
def _bad_rad(root: Path, i: int, **change) -> Path:
    rows = json.loads((root / VQA_RAD_JSON).read_text())
    for k, v in change.items():
        if v is None:
            rows[i].pop(k)
        else:
            rows[i][k] = v
    return _json(root / VQA_RAD_JSON, rows)


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"image_name": "nope.jpg"}, "missing image 'nope.jpg'"),
        ({"image_name": "broken.png"}, "unreadable image"),
        ({"question": None}, "missing 'question'"),
        ({"answer": None}, "missing 'answer'"),
        ({"answer": "  "}, "empty 'answer'"),
        ({"answer": ["yes"]}, "'answer' must be a string, got list"),
    ],
)
def test_vqa_rad_bad_record(vqa_rad, change, reason):
    (vqa_rad / "VQA_RAD Image Folder" / "broken.png").write_bytes(b"not an image")
    path = _bad_rad(vqa_rad, 0, **change)
    with pytest.raises(DataError) as ei:
        load_vqa_rad(vqa_rad, "train", "all")
    e = ei.value
    assert e.path == str(path) and e.record == "vqa_rad-00000" and reason in str(e)
    assert str(path) in str(e) and "vqa_rad-00000" in str(e)
    ok = load_vqa_rad(vqa_rad, "train", "all", skip_bad=True)
    assert ok.n_skipped == 1 and ok.skipped[0].record == "vqa_rad-00000"
    assert [s.id for s in ok] == ["vqa_rad-00001", "vqa_rad-00002"]


def test_slake_bad_records(slake):
    rows = json.loads((slake / "train.json").read_text())
    rows[0].pop("q_lang")
    rows[2]["img_name"] = "xmlab9/source.jpg"
    rows.append("not an object")
    rows.append(dict(rows[3]))  # duplicate qid 14
    path = _json(slake / "train.json", rows)
    with pytest.raises(DataError, match="missing 'q_lang'") as ei:
        load_slake(slake, "train", "all")
    assert ei.value.path == str(path) and ei.value.record == "slake-11"
    ok = load_slake(slake, "train", "all", skip_bad=True)
    assert [s.id for s in ok] == ["slake-14"]
    reasons = {e.record: e.reason for e in ok.skipped}
    assert set(reasons) == {"slake-11", "slake-13", "slake-train-4", "slake-14"}
    assert reasons["slake-13"].startswith("missing image 'xmlab9/source.jpg'")
    assert reasons["slake-train-4"] == "expected a JSON object, got str"
    assert reasons["slake-14"].startswith("duplicate id")


def test_malformed_json_names_position(vqa_rad, slake, pathvqa):
    (vqa_rad / VQA_RAD_JSON).write_text('[\n {"qid": 0,\n  "question": "Is it?" "answer": "yes"}\n]')
    for skip in (False, True):  # a broken file cannot be skipped record by record
        with pytest.raises(DataError, match=r"malformed JSON \(Expecting ',' delimiter at line 3 column") as ei:
            load_vqa_rad(vqa_rad, "train", skip_bad=skip)
        assert ei.value.path == str(vqa_rad / VQA_RAD_JSON) and ei.value.line == 3
    _json(slake / "test.json", {"data": []})
    with pytest.raises(DataError, match="expected a JSON list of records, got a JSON dict"):
        load_slake(slake, "test")
    (pathvqa / "val_qa.json").write_text("")
    with pytest.raises(DataError, match=r"val_qa\.json:1: malformed JSON"):
        load_pathvqa(pathvqa, "val")


def test_empty_split_and_missing_file(vqa_rad, slake, pathvqa, tmp_path):
    _json(slake / "validate.json", [])
    with pytest.raises(DataError, match=r"validate\.json: empty split: no records in split 'validate'"):
        load_slake(slake, "val", "all")
    _json(slake / "validate.json", [dict(SLAKE_TRAIN[1])])  # only Chinese
    with pytest.raises(DataError, match="empty split"):
        load_slake(slake, "validate", "all")
    _json(slake / "validate.json", [dict(SLAKE_TRAIN[0], qid=21)])  # one closed question
    with pytest.raises(DataError, match=r"empty split: no open \(non-yes/no\) questions in split 'validate'"):
        load_slake(slake, "validate", "open")
    # every record bad + skip_bad: still an empty split, with the count
    _json(pathvqa / "test_qa.json", [{"image": "x.jpg", "question": "q?", "answer": "yes"}])
    with pytest.raises(DataError, match=r"1 bad record\(s\) skipped"):
        load_pathvqa(pathvqa, "test", "all", skip_bad=True)
    (slake / "train.json").unlink()
    with pytest.raises(DataError, match=r"train\.json: file not found"):
        load_slake(slake, "train")
    with pytest.raises(DataError, match="no PathVQA QA file for split 'train'"):
        load_pathvqa(tmp_path / "empty_dir", "train")


def test_pathvqa_refuses_pickle(tmp_path):
    root = tmp_path / "pvqa"
    (root / "qas" / "train").mkdir(parents=True)
    pkl = root / "qas" / "train" / "train_qa.pkl"
    pkl.write_bytes(b"\x80\x04N.")  # a pickle of None: never unpickled
    with pytest.raises(DataError, match="pickle files are not read .*convert it to a JSON list") as ei:
        load_pathvqa(root, "train")
    assert ei.value.path == str(pkl)
    with pytest.raises(DataError, match="pickle files are not read"):
        load_pathvqa(pkl, "train")
    (root / "test_qa.pkl").write_bytes(b"\x80\x04N.")
    with pytest.raises(DataError, match="pickle files are not read") as ei:
        load_pathvqa(root, "test")
    assert ei.value.path == str(root / "test_qa.pkl")


def test_relative_root_gives_absolute_paths(vqa_rad, monkeypatch):
    monkeypatch.chdir(vqa_rad.parent)
    s = load_vqa_rad("vqa_rad", "train", "closed")[0]
    assert Path(s.image_path).is_absolute() and Path(s.image_path).is_file()
    written = vqa_to_jsonl("vqa_rad", "vqa_rad", "out", splits=["test"])
    back = load_samples(written["test_closed"], "vqa_rad_closed")  # resolved against out/
    assert [(b.id, b.answer) for b in back] == [("vqa_rad-00004", "no")]
