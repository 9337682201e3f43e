"""MedMNIST ``.npz`` loading: fixtures made here, errors naming file and key, a real-file smoke test."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from jomed_fast.data import (
    DataError,
    load_medmnist,
    load_medmnist_all,
    load_samples,
    medmnist_to_jsonl,
)
from jomed_fast.tasks import get_task

SHARED = Path(os.environ.get("JOMED_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _npz(path: Path, n=(6, 3, 4), size=28, rgb=False, labels="column", n_classes=2, **override) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n):
        shape = (k, size, size, 3) if rgb else (k, size, size)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        lab = np.arange(k) % n_classes
        if labels == "column":
            lab = lab[:, None]
        elif labels == "multi":
            lab = (rng.uniform(size=(k, n_classes)) < 0.4).astype(np.uint8)
        arrays[f"{split}_labels"] = lab.astype(np.uint8)
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


def test_grey_binary_with_label_map(tmp_path):
    p = _npz(tmp_path / "breastmnist.npz", labels="column")
    train = load_medmnist(p, "train", "breast")
    assert len(train) == 6 and train.images.shape == (6, 28, 28) and not train.is_rgb
    assert train.labels.shape == (6,)  # [n, 1] flattened
    assert train.image_rgb(0).shape == (28, 28, 3) and np.array_equal(train.image_rgb(0)[..., 2], train.images[0])
    # BreastMNIST 0 = malignant -> "Yes" (class 1)
    assert [train.class_label(i) for i in range(2)] == [1, 0]
    samples = list(train.samples())
    assert [s.answer for s in samples[:2]] == ["Yes", "No"] and samples[0].id == "breastmnist-train-00000"
    assert set(load_medmnist_all(p, "breast")) == {"train", "val", "test"}
    flat = _npz(tmp_path / "flat.npz", labels="flat")  # (N,) labels as in the shared BreastMNIST copy
    assert load_medmnist(flat, "val", "breast").labels.shape == (3,)


def test_rgb_multiclass_and_multilabel(tmp_path):
    r = load_medmnist(_npz(tmp_path / "retina.npz", rgb=True, n_classes=5), "test", "retina")
    assert r.is_rgb and r.images.shape == (4, 28, 28, 3) and [r.class_label(i) for i in range(4)] == [0, 1, 2, 3]
    m = load_medmnist(_npz(tmp_path / "ml.npz", rgb=True, labels="multi", n_classes=14, size=64), "train", "brset")
    assert m.multilabel and m.labels.shape == (6, 14) and m.images.shape[1] == 64
    for i in range(6):
        assert m.class_label(i) == frozenset(np.flatnonzero(m.labels[i]).tolist())
    no_task = load_medmnist(tmp_path / "ml.npz", "val")
    with pytest.raises(ValueError, match="needs the split to be loaded with a task"):
        next(no_task.samples())


def test_to_jsonl_round_trip(tmp_path):
    p = _npz(tmp_path / "retinamnist.npz", rgb=True, n_classes=5)
    written = medmnist_to_jsonl(p, tmp_path / "out", "retina", splits=("train", "test"), limit=5)
    back = load_samples(written["train"], "retina", load_images=True)
    data = load_medmnist(p, "train", "retina")
    assert len(back) == 5
    for i, s in enumerate(back):
        assert np.array_equal(s.image, data.images[i]) and s.label == data.class_label(i) and s.answer == str(i % 5)
    assert len(load_samples(written["test"], "retina")) == 4


@pytest.mark.parametrize(
    "kwargs, split, task, reason",
    [
        (dict(val_labels=None), "val", None, "missing key 'val_labels'"),
        (
            dict(train_labels=np.zeros((5, 1), np.uint8)),
            "train",
            None,
            "mismatched counts: 'train_images' has 6 images but 'train_labels' has 5 labels",
        ),
        (dict(train_images=np.zeros((6, 28, 28), np.float32)), "train", None, "expected uint8 pixels"),
        (dict(train_images=np.zeros((6, 28), np.uint8)), "train", None, "expected [n, H, W] or [n, H, W, 3]"),
        (
            dict(test_labels=np.array([[0], [1], [7], [1]], np.uint8)),
            "test",
            "breast",
            "test_labels[2] = 7 is outside the label set of task 'breast'",
        ),
        (dict(), "train", "brset", "single-label) but task 'brset' is multilabel"),
        (dict(train_labels=np.full((6, 1), 0.5)), "train", None, "expected integer labels"),
    ],
)
def test_bad_files(tmp_path, kwargs, split, task, reason):
    p = _npz(tmp_path / "bad.npz", **kwargs)
    with pytest.raises(DataError) as e:
        load_medmnist(p, split, task)
    assert str(e.value).startswith(f"{p}: ") and reason in str(e.value)


def test_bad_multilabel_rows_and_unreadable_files(tmp_path):
    p = _npz(tmp_path / "ml.npz", labels="multi", n_classes=14, val_labels=np.array([[0] * 13 + [2]] * 3, np.uint8))
    with pytest.raises(DataError, match=r"val_labels\[0\] = .* outside the label set of task 'brset'"):
        load_medmnist(p, "val", "brset")
    with pytest.raises(DataError, match="has 14 label columns, task 'vindr_pcxr' has 15"):
        load_medmnist(p, "train", "vindr_pcxr")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip archive")
    with pytest.raises(DataError, match=r"junk\.npz: not a readable \.npz file"):
        load_medmnist(junk)
    with pytest.raises(DataError, match="file not found"):
        load_medmnist(tmp_path / "absent.npz")
    with pytest.raises(ValueError, match="split"):
        load_medmnist(p, "dev")


# ------------------------------------------------------------------------------------------------
# the real files in ../shared/data (skipped when the folder is absent)
# ------------------------------------------------------------------------------------------------
needs_shared = pytest.mark.skipif(not (SHARED / "breastmnist.npz").exists(), reason=f"no shared data at {SHARED}")


@needs_shared
def test_real_breastmnist():
    sizes = {}
    for split, want in (("train", (147, 399)), ("val", (21, 57)), ("test", (42, 114))):
        d = load_medmnist(SHARED / "breastmnist.npz", split, "breast")
        sizes[split] = len(d)
        assert d.images.shape[1:] == (28, 28) and tuple(np.bincount(d.labels)) == want
        yes = sum(d.class_label(i) == 1 for i in range(len(d)))
        assert yes == want[0]  # malignant -> "Yes"
    assert sizes == {"train": 546, "val": 78, "test": 156}


@needs_shared
def test_real_retinamnist():
    task = get_task("retina")
    counts = {"train": [486, 128, 206, 194, 66], "val": [54, 12, 28, 20, 6], "test": [174, 46, 92, 68, 20]}
    for split, want in counts.items():
        d = load_medmnist(SHARED / "retinamnist.npz", split, task)
        assert d.images.shape[1:] == (28, 28, 3) and np.bincount(d.labels).tolist() == want
        s = next(d.samples())
        assert s.answer in task.labels and s.image.shape == (28, 28, 3)
