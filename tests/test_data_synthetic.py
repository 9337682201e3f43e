"""The synthetic task and index: determinism, balance, round trip, difficulty, retrieval value."""

from __future__ import annotations

import filecmp
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from jomed_fast.data import DataError, records_digest
from jomed_fast.data.synthetic import (
    ATYPICAL_LOOK,
    CLASS_KEYWORDS,
    FINDINGS,
    NUM_CLASSES,
    SyntheticConfig,
    SyntheticGenerator,
    generate,
    images_array,
    load_synthetic,
    render_ultrasound,
    write_synthetic,
)
from jomed_fast.data.synthetic.captions import _DX_HEDGED
from jomed_fast.identity import json_digest
from jomed_fast.tasks import get_task

SMALL = SyntheticConfig(seed=7, n_train=40, n_val=10, n_test=25, index_size=120, prototypes_per_class=4)


@pytest.fixture(scope="module")
def small():
    return generate(SMALL)


@pytest.fixture(scope="module")
def medium():
    """Large enough for the statistical checks (about 1 s to generate)."""
    return generate(SyntheticConfig(seed=11, n_train=300, n_val=0, n_test=250, index_size=800, hedged_rate=0.3))


def _tree(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------------
# determinism
# ------------------------------------------------------------------------------------------------
def test_same_seed_same_bytes_other_seed_other_data(tmp_path, small):
    a = write_synthetic(small, tmp_path / "a")
    b = write_synthetic(generate(SMALL), tmp_path / "b")
    files = _tree(a)
    assert files == _tree(b) and len(files) == 5 + 40 + 10 + 25 + 120
    _, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert mismatch == [] and errors == []

    c = write_synthetic(
        generate(SyntheticConfig(**{**SMALL.to_dict(), "seed": 8, "visibility": (0.5, 1.0)})), tmp_path / "c"
    )
    assert _tree(c) == files  # same ids and layout ...
    _, mismatch, _ = filecmp.cmpfiles(a, c, files, shallow=False)
    assert len(mismatch) > 0.95 * len(files)  # ... other content


# Digests of generated data, computed once and pinned: (records_digest of every sample and record:
# ids, answers, labels, captions, pixels; the digest of their metadata; the digest of the JSONL
# checksums write_synthetic puts in its manifest). Any change to a random draw, the rendering, the
# wording or the file format changes them; then GENERATOR_VERSION changes too, and the demo's
# findings (tests/test_demo_findings.py) are measured again.
PINNED = {
    "small": (
        SMALL,
        "0360fe52b633495c997d2ca88a35227100129393db11683cbd3e7d0f87ee96a3",
        "01921162638763144e7d5b21ab8ef4f2054ff3862171e4d6bc1a45183df1813c",
        "b7bcd65498651d5e456f1e75bb15b213f1bba00b2c30223729f8c6d176fb8341",
    ),
    "every_option": (
        SyntheticConfig(
            seed=3,
            image_size=40,
            n_train=30,
            n_val=5,
            n_test=20,
            index_size=80,
            prototypes_per_class=3,
            atypical_rate=0.6,
            label_noise=0.3,
            hedged_rate=0.4,
            atypical_cue=0.5,
        ),
        "c2122f06ad368be7ec12abb97ac7a72919d424149d6d2bc067016ccccc4dfb90",
        "0119a54ac624e76da0f2a4cfe7bb7d8681266605463b5f3bff606c467902a249",
        "0165967c3914be9609ee4a2c6a789fea86af80d8ae1c76d8b731f9afd7bf481e",
    ),
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_generated_data_equal_the_pinned_digests(tmp_path, name):
    config, content, meta, files = PINNED[name]
    ds = generate(config)
    recs = [*ds.train, *ds.val, *ds.test, *ds.index]
    manifest = json.loads((write_synthetic(ds, tmp_path / name) / "manifest.json").read_text())
    assert (records_digest(recs), json_digest([r.extra for r in recs]), json_digest(manifest["files"])) == (
        content,
        meta,
        files,
    )


def test_items_render_alone_in_any_order(small):
    g = SyntheticGenerator(SMALL)
    for i in (119, 0, 57):
        r = g.index_record(i)
        assert r.id == small.index[i].id and r.text == small.index[i].text and r.extra == small.index[i].extra
        assert np.array_equal(r.image, small.index[i].image)
    s = g.sample("test", 24)
    assert s.id == "syn-test-000024" and np.array_equal(s.image, small.test[24].image)
    assert [r.id for r in g.index_records(10, 13)] == ["syn-idx-0000010", "syn-idx-0000011", "syn-idx-0000012"]
    with pytest.raises(IndexError):
        g.index_record(120)
    with pytest.raises(ValueError, match="split"):
        g.sample("dev", 0)


def test_images_and_ids(small):
    for split in ("train", "val", "test", "index"):
        recs = small.split(split)
        assert len({r.id for r in recs}) == len(recs)
        for r in recs[:5]:
            assert r.image.shape == (32, 32, 3) and r.image.dtype == np.uint8
    assert generate(SyntheticConfig(n_train=2, n_val=0, n_test=0, index_size=0, image_size=48)).train[
        0
    ].image.shape == (48, 48, 3)


def test_config_validation():
    for bad in (
        dict(seed=-1),
        dict(image_size=8),
        dict(atypical_rate=1.5),
        dict(visibility=(0.0, 1.0)),
        dict(relevant_fraction=0.9, misleading_fraction=0.2),
        dict(train_prototype_fraction=0.0),
        {"hedged_rate": 1.5},
        {"atypical_cue": -0.1},
        {"atypical_cue": 1.5},
    ):
        with pytest.raises(ValueError, match="SyntheticConfig"):
            SyntheticConfig(**bad)
    assert SyntheticConfig.from_dict(SMALL.to_dict()) == SMALL
    with pytest.raises(ValueError, match="unknown keys"):
        SyntheticConfig.from_dict({"seed": 1, "colour": "red"})


# ------------------------------------------------------------------------------------------------
# structure
# ------------------------------------------------------------------------------------------------
def test_class_balance_and_answers(medium):
    task = get_task("synthetic")
    for split in ("train", "test"):
        recs = medium.split(split)
        counts = Counter(s.label for s in recs)
        assert sorted(counts) == list(range(NUM_CLASSES))
        assert max(counts.values()) - min(counts.values()) <= 1
        assert all(s.answer == task.format_answer(s.label) for s in recs)
        assert all(s.question is None for s in recs)  # the task's fixed question applies
    labels = [s.label for s in medium.train]
    assert labels != sorted(labels) and labels[:NUM_CLASSES] != list(range(NUM_CLASSES))  # shuffled


def test_prototypes_split_and_index_coverage(medium):
    g = SyntheticGenerator(medium.config)
    train_p = {s.extra["meta"]["prototype"] for s in medium.train}
    test_p = {s.extra["meta"]["prototype"] for s in medium.test}
    assert train_p.isdisjoint(test_p)  # test cases are unseen by a reader trained on train
    rel = Counter(r.extra["meta"]["prototype"] for r in medium.index if r.extra["meta"]["kind"] == "relevant")
    assert set(rel) == {p.id for p in g.prototypes} and max(rel.values()) - min(rel.values()) <= 1
    kinds = Counter(r.extra["meta"]["kind"] for r in medium.index)
    assert kinds == {"relevant": 400, "misleading": 120, "distractor": 280}
    for p in g.prototypes:
        assert p.look == (ATYPICAL_LOOK[p.label] if p.atypical else p.label)
    assert 0.1 < np.mean([p.atypical for p in g.prototypes]) < 0.5


def test_label_noise():
    ds = generate(SyntheticConfig(seed=3, n_train=200, n_val=0, n_test=0, index_size=0, label_noise=0.5))
    noisy = [s for s in ds.train if s.extra["meta"]["noisy"]]
    assert 60 < len(noisy) < 140
    assert all(s.label != s.extra["meta"]["true_label"] for s in noisy)
    assert all(s.label == s.extra["meta"]["true_label"] for s in ds.train if not s.extra["meta"]["noisy"])


def test_captions(medium):
    all_keywords = [k for ks in CLASS_KEYWORDS.values() for k in ks]
    for r in medium.index:
        m, text = r.extra["meta"], r.text.lower()
        if m["kind"] == "relevant":
            assert any(k in text for k in CLASS_KEYWORDS[m["label"]]), text  # names its class ...
            assert any(f.lower() in text for f in FINDINGS[m["look"]]), text  # ... and the findings seen
            if m["look"] != m["label"]:
                assert "atypical" in text
        elif m["kind"] == "misleading":
            assert m["label"] != m["look"]
            assert any(k in text for k in CLASS_KEYWORDS[m["label"]]) and "atypical" not in text
        else:
            assert not any(k in text for k in all_keywords), text
        assert text.endswith(".") and r.text[0].isupper()
        hedged_words = any(h.format("").strip() in text for h in _DX_HEDGED)
        assert hedged_words == bool(m.get("hedged")), text  # hedged wording exactly on hedged records
        if m["kind"] == "misleading":
            assert m["hedged"]
        if m["kind"] == "relevant" and m["look"] != m["label"]:
            assert not m["hedged"]  # atypical cases are biopsy-proven
    relevant = [
        r.extra["meta"]
        for r in medium.index
        if r.extra["meta"]["kind"] == "relevant" and r.extra["meta"]["look"] == r.extra["meta"]["label"]
    ]
    share = np.mean([m["hedged"] for m in relevant])
    assert abs(share - medium.config.hedged_rate) < 0.1, share


# ------------------------------------------------------------------------------------------------
# disk round trip
# ------------------------------------------------------------------------------------------------
def test_write_then_load_is_identical(tmp_path, small):
    out = write_synthetic(small, tmp_path / "syn")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"] == SMALL.to_dict() and manifest["counts"]["index"] == 120
    back = load_synthetic(out)
    assert back.config == SMALL and back.task.name == "synthetic"
    for split in ("train", "val", "test", "index"):
        for a, b in zip(small.split(split), back.split(split), strict=True):
            assert a.id == b.id and a.extra == b.extra and np.array_equal(a.image, b.image)
            if split == "index":
                assert a.text == b.text
            else:
                assert (a.answer, a.label, a.question) == (b.answer, b.label, b.question)
    lazy = load_synthetic(out, load_images=False)
    assert lazy.train[0].image is None and np.array_equal(lazy.train[0].load_image(), small.train[0].image)


def test_load_refuses_incomplete_or_changed_folders(tmp_path, small):
    out = write_synthetic(small, tmp_path / "syn")
    lines = (out / "val.jsonl").read_text().splitlines()
    (out / "val.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DataError, match=r"val\.jsonl: checksum differs from the manifest"):
        load_synthetic(out)
    with pytest.raises(DataError, match="has 9 records, the manifest says 10"):
        load_synthetic(out, verify=False)
    (out / "manifest.json").unlink()
    with pytest.raises(DataError, match="missing manifest"):
        load_synthetic(out)
    write_synthetic(small, out)  # rewriting repairs it
    (out / "images" / "test" / "syn-test-000003.png").unlink()
    with pytest.raises(DataError, match=r"test\.jsonl:4: missing image .*syn-test-000003"):
        load_synthetic(out)


# ------------------------------------------------------------------------------------------------
# difficulty: the image alone is informative but not enough; retrieval helps, a better one more
# ------------------------------------------------------------------------------------------------
def _grey(recs) -> np.ndarray:
    return images_array(recs)[..., 0].astype(np.float64) / 255.0


def _features(recs) -> np.ndarray:
    """Intensity quantiles (what the lesion looks like) + an 8x8 thumbnail (where it is)."""
    g = _grey(recs)
    n, s = g.shape[0], g.shape[1]
    q = np.quantile(g.reshape(n, -1), np.linspace(0.005, 0.995, 16), axis=1).T
    thumb = g.reshape(n, 8, s // 8, 8, s // 8).mean((2, 4)).reshape(n, -1)
    return np.concatenate([q, thumb], 1)


def _centroid_right(train, test) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-centroid classifier (intensity quantiles + thumbnail): right per test case, and
    which test cases are atypical."""
    a, b = _features(train), _features(test)
    y_tr, y_te = np.array([s.label for s in train]), np.array([s.label for s in test])
    mu, sd = a.mean(0), a.std(0) + 1e-9
    a, b = (a - mu) / sd, (b - mu) / sd
    centroids = np.stack([a[y_tr == c].mean(0) for c in range(NUM_CLASSES)])
    right = ((b[:, None] - centroids[None]) ** 2).sum(-1).argmin(1) == y_te
    return right, np.array([s.extra["meta"]["atypical"] for s in test])


def test_label_is_in_the_image_but_not_entirely(medium):
    right, atypical = _centroid_right(medium.train, medium.test)
    assert 0.3 < right.mean() < 0.8, right.mean()  # chance is 0.2
    assert right[~atypical].mean() > right[atypical].mean() + 0.05  # atypical cases mislead


def test_atypical_cue_marks_atypical_cases_only():
    config = SyntheticConfig(seed=3, n_train=300, n_val=0, n_test=250, index_size=200)
    plain, cued = SyntheticGenerator(config), SyntheticGenerator(config, atypical_cue=0.6)
    for split, n in (("train", 300), ("test", 250)):
        for i in range(0, n, 7):
            a, b = plain.sample(split, i), cued.sample(split, i)
            changed = not np.array_equal(a.image, b.image)
            assert changed == a.extra["meta"]["atypical"], (split, i)
    for i in range(200):
        a, b = plain.index_record(i), cued.index_record(i)
        atypical = a.extra["meta"]["kind"] == "relevant" and plain.prototypes[a.extra["meta"]["prototype"]].atypical
        assert (not np.array_equal(a.image, b.image)) == atypical, i
        assert a.text == b.text and a.extra == b.extra
    # a full cue is the case rendered with its own class's look (same geometry, same random draws)
    proto = next(p for p in plain.prototypes if p.atypical)
    geom = SyntheticGenerator._geom(proto)
    full = render_ultrasound(geom, proto.look, 0.9, 32, np.random.default_rng(5), 0.3, cue_look=proto.label, cue=1.0)
    own = render_ultrasound(geom, proto.label, 0.9, 32, np.random.default_rng(5), 0.3)
    assert np.abs(full.astype(int) - own).max() <= 1
    # the cue makes atypical cases more recognisable from the image (0.40 -> 0.56 here)
    (r0, atypical), (r1, _) = (_centroid_right(g.samples("train"), g.samples("test")) for g in (plain, cued))
    assert r1[atypical].mean() > r0[atypical].mean() + 0.1, (r0[atypical].mean(), r1[atypical].mean())


def _retrieval_accuracy(medium, factor: int) -> tuple[float, float]:
    """Top-1 nearest index image (L2 on a ``factor``-downsampled image); its caption's class."""

    def emb(recs):
        g = _grey(recs)
        n, s = g.shape[0], g.shape[1]
        return g.reshape(n, s // factor, factor, s // factor, factor).mean((2, 4)).reshape(n, -1)

    q, idx = emb(medium.test), emb(medium.index)
    d = (q**2).sum(1)[:, None] + (idx**2).sum(1)[None] - 2 * q @ idx.T
    top = d.argmin(1)
    named = np.array([r.extra["meta"]["label"] if r.extra["meta"]["label"] is not None else -1 for r in medium.index])
    kind = np.array([r.extra["meta"]["kind"] for r in medium.index])
    y = np.array([s.label for s in medium.test])
    return float((named[top] == y).mean()), float((kind[top] == "misleading").mean())


def test_retrieval_helps_and_a_better_retriever_helps_more(medium):
    fine, fine_misled = _retrieval_accuracy(medium, 2)  # matches the case
    coarse, coarse_misled = _retrieval_accuracy(medium, 8)  # matches only the look
    assert fine > 0.8, fine
    assert coarse < fine - 0.08, (coarse, fine)
    assert coarse_misled > fine_misled  # misleading records fool the coarse retriever more
