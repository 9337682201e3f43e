"""The real-data study (``jomed_fast.study``): the single-system bootstrap against a resampling by
hand with scikit-learn's metrics, the supervised baselines against scikit-learn and on tasks they
must solve, the aggregate against numpy, the stated findings against hand-made runs, the dataset
split on the real BreastMNIST file, and the ``ci`` preset end to end through the CLI (its numbers
recomputed from the run's own prediction files)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score

from jomed_fast.analysis import PredictionRecord
from jomed_fast.analysis.significance import bootstrap_interval
from jomed_fast.study import PRESETS
from jomed_fast.study.document import statements
from jomed_fast.study.summary import aggregate, mean_sd
from jomed_fast.study.supervised import LOGREG_GRID, images_array, pixel_logreg, small_cnn

SHARED = Path(os.environ.get("JOMED_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_shared = pytest.mark.skipif(not (SHARED / "breastmnist.npz").exists(), reason=f"no shared data at {SHARED}")


def _system(gold, pred):
    return [PredictionRecord(f"q{i}", int(g), "multiclass", [], int(p)) for i, (g, p) in enumerate(zip(gold, pred))]


def test_bootstrap_interval_is_the_quantile_of_the_metrics_of_resamples_drawn_by_hand():
    rng = np.random.default_rng(4)
    gold = rng.integers(0, 3, 60)
    pred = np.where(rng.random(60) < 0.7, gold, rng.integers(0, 3, 60))
    got = bootstrap_interval(_system(gold, pred), 3, n_boot=300, seed=11)
    assert got["accuracy"]["value"] == pytest.approx(accuracy_score(gold, pred), abs=1e-12)
    assert got["macro_f1"]["value"] == pytest.approx(f1_score(gold, pred, average="macro"), abs=1e-12)
    idx = np.random.default_rng(11).integers(0, 60, size=(300, 60))  # one chunk: the same draws
    acc = [accuracy_score(gold[i], pred[i]) for i in idx]
    f1 = [f1_score(gold[i], pred[i], labels=[0, 1, 2], average="macro", zero_division=0) for i in idx]
    assert got["accuracy"]["ci"] == pytest.approx(np.quantile(acc, [0.025, 0.975]).tolist(), abs=1e-12)
    assert got["macro_f1"]["ci"] == pytest.approx(np.quantile(f1, [0.025, 0.975]).tolist(), abs=1e-12)
    with pytest.raises(ValueError, match="at least one query"):
        bootstrap_interval([], 3)


def _images(n, rng, bright):
    """``[n, 8, 8, 3]`` uint8: class 1 images brighter in the top half than class 0's."""
    y = rng.integers(0, 2, n)
    x = rng.integers(0, 120, size=(n, 8, 8, 3)).astype(np.uint8)
    x[y == 1, :4] += np.uint8(bright)
    return images_array(list(x)), y


def test_pixel_logreg_keeps_the_grid_point_best_on_validation_and_answers_as_sklearn_does():
    rng = np.random.default_rng(0)
    (x, y), (vx, vy), (tx, ty) = (_images(n, rng, 60) for n in (200, 80, 80))
    got = pixel_logreg(x, y, vx, vy, tx, 2, seed=0)
    assert accuracy_score(ty, got["test"]) > 0.95
    flat = [a.reshape(len(a), -1).astype(np.float64) for a in (x, vx, tx)]
    mu, sd = flat[0].mean(0), flat[0].std(0) + 1e-6
    scores = {}
    for c, w in LOGREG_GRID:
        m = LogisticRegression(C=c, class_weight=w, max_iter=500, random_state=0).fit((flat[0] - mu) / sd, y)
        p = m.predict((flat[1] - mu) / sd)
        scores[(c, w)] = (f1_score(vy, p, average="macro"), accuracy_score(vy, p), m)
    best = max(scores, key=lambda k: scores[k][:2])  # max keeps the first of equals, as the grid does
    assert scores[best][:2] == pytest.approx(got["val"])
    assert got["selected"] == {"C": best[0], "class_weight": best[1]}
    assert np.array_equal(got["test"], scores[best][2].predict((flat[2] - mu) / sd))
    with pytest.raises(ValueError, match="train_y: expected"):
        pixel_logreg(x, y + 5, vx, vy, tx, 2)


def test_small_cnn_learns_an_easy_task_and_is_the_same_for_the_same_seed():
    rng = np.random.default_rng(1)
    (x, y), (vx, vy), (tx, ty) = (_images(n, rng, 100) for n in (256, 64, 64))
    a = small_cnn(x, y, vx, vy, tx, 2, epochs=6, seed=3)
    b = small_cnn(x, y, vx, vy, tx, 2, epochs=6, seed=3)
    assert accuracy_score(ty, a["test"]) > 0.9
    assert np.array_equal(a["test"], b["test"]) and a["selected"] == b["selected"]
    assert 1 <= a["selected"]["epoch"] <= 6
    with pytest.raises(ValueError, match="epochs: expected >= 1"):
        small_cnn(x, y, vx, vy, tx, 2, epochs=0)


def _cmp(diff, p):
    return {"diff_accuracy": diff, "p_mcnemar": p, "ci95_accuracy": [diff - 0.05, diff + 0.05]}


def _run(seed, jomed, rag, p, inconsistent=None, consistent=None, random_retrieval=0.5, head_epoch=0, flat=0.99):
    cell = lambda v: {"value": v, "ci": [v - 0.05, v + 0.05]}  # noqa: E731
    systems = {
        "reader_only": 0.5,
        "ft_rag": rag,
        "jomed": jomed,
        "knn_vote": 0.4,
        "pixel_logreg": 0.6,
        "small_cnn": 0.55,
        "majority": 0.45,
    }
    comparisons = {}
    for a, b in (("ft_rag", "jomed"), ("reader_only", "ft_rag")) + tuple(
        (x, "jomed") for x in ("knn_vote", "pixel_logreg", "small_cnn", "majority")
    ):
        d = systems[b] - systems[a]
        comparisons[f"{b} vs {a}"] = {
            "all": _cmp(d, p if a == "ft_rag" else 0.5),
            "inconsistent": None,
            "consistent": None,
        }
    comparisons["jomed vs ft_rag"]["inconsistent"] = inconsistent
    comparisons["jomed vs ft_rag"]["consistent"] = consistent
    head = {
        "selected_epoch": head_epoch,
        "val_system_accuracy_before": 0.5,
        "val_system_accuracy_selected": 0.5,
        "val_distinct_records_before": 10,
        "warnings": ["flat target"] if flat > 0.95 else [],
        "dedup": None,
        "epochs": [{"epoch": 1, "target_entropy_share": flat, "reader_right_share": 0.5, "val_distinct_records": 9}],
    }
    robust = {
        r: {"accuracy": v, "macro_f1": v}
        for r, v in (("jomed", jomed), ("random retrieval", random_retrieval), ("no query image", 0.5))
    }
    return {
        "seed": seed,
        "queries": 100,
        "counts": {"train": 1, "val": 1, "test": 100, "index": 1},
        "knn_k": 4,
        "systems": {k: {"accuracy": cell(v), "macro_f1": cell(v)} for k, v in systems.items()},
        "comparisons": comparisons,
        "consistency": {"share_inconsistent": 0.2},
        "robustness": robust,
        "answer_changed": {"no retrieval": 0.1, "random retrieval": 0.02 * (seed + 1), "no query image": 0.3},
        "stage2": {"text": head},
        "supervised_selected": {},
    }


def test_aggregate_and_statements_count_what_the_runs_show():
    runs = [
        _run(0, 0.70, 0.60, 0.01, _cmp(0.2, 0.01), _cmp(0.05, 0.3), random_retrieval=0.55),
        _run(1, 0.62, 0.60, 0.40, _cmp(0.0, 1.0), _cmp(0.03, 0.5), random_retrieval=0.45),
        _run(2, 0.55, 0.60, 0.02, random_retrieval=0.45, head_epoch=1, flat=0.5),
    ]
    agg = aggregate({"d": runs})["d"]
    jomed = agg["systems"]["jomed"]["accuracy"]
    assert jomed["mean"] == pytest.approx(np.mean([0.70, 0.62, 0.55]))
    assert jomed["sd"] == pytest.approx(np.std([0.70, 0.62, 0.55], ddof=1))
    assert mean_sd([0.3]) == {"mean": 0.3, "sd": None}
    gain = agg["comparisons"]["jomed vs ft_rag"]["all"]
    assert (gain["significant_gain"], gain["significant_loss"]) == (1, 1)
    said = "\n".join(statements(agg))
    assert (
        "JOMED over fine-tuned RAG (the paper's main finding): 1 of 3 seeds show a gain at p < 0.05, 1 a loss" in said
    )
    assert "logistic regression on pixels" in said  # the strongest baseline by mean accuracy (0.6)
    assert "larger on the inconsistent split than on the consistent one on 1 of the 2 seeds" in said
    assert "Random retrieval at or above reader-only (the paper's Table 7): 1 of 3 seeds" in said
    assert "changed JOMED's answer on 4.0% of the test queries on average, no retrieval on 10.0%" in said
    assert "top 4 is below the majority class on 3 of 3 seeds (40.0 ± 0.0 against 45.0 ± 0.0)" in said
    from jomed_fast.study.document import _why_no_gain

    why = "\n".join(_why_no_gain(agg))
    assert "On 1 of these 2 seeds every head's target was near-flat" in why
    assert "for the text head on 1 of them" in why  # seed 1 kept epoch 0, seed 2 epoch 1
    assert "changed the reader's answer on 4.0-6.0% of the test queries" in why
    assert "| 1 | +2.0 (0.4) | 4.0 | 0; 0.990; flat target |" in why
    assert "| 2 | -5.0 (0.02) | 6.0 | 1; 0.500; - |" in why
    assert "| 0 |" not in why  # seed 0's gain is significant


@needs_shared
def test_the_dataset_split_is_stratified_disjoint_and_refuses_other_inputs(tmp_path):
    from jomed_fast.study.data import prepare_dataset

    kw = dict(fraction=0.3, seed=0, template="Findings consistent with {label}.")
    ds = prepare_dataset(SHARED / "breastmnist.npz", tmp_path, "breast", **kw)
    assert (len(ds.train), len(ds.index), len(ds.val), len(ds.test)) == (382, 164, 78, 156)
    names = ds.task.label_names or ds.task.labels
    assert {r.text for r in ds.index} == {f"Findings consistent with {n}." for n in names}
    index_ids = {r.id.removeprefix("index/") for r in ds.index}
    assert not index_ids & {s.id for s in ds.train}
    # the official split's 147 malignant / 399 benign: round(0.3 n_c) of each became records
    assert sum(r.extra["answer"] == "Yes" for r in ds.index) == round(0.3 * 147)
    again = prepare_dataset(SHARED / "breastmnist.npz", tmp_path, "breast", **kw)
    assert [s.id for s in again.train] == [s.id for s in ds.train]
    with pytest.raises(ValueError, match=r"other inputs \(\['index_fraction'\]\)"):
        prepare_dataset(SHARED / "breastmnist.npz", tmp_path, "breast", **{**kw, "fraction": 0.2})


@needs_shared
def test_the_ci_study_runs_on_real_data_and_its_numbers_are_its_predictions(tmp_path):
    from jomed_fast.cli import main
    from jomed_fast.infer import read_predictions

    out, doc = tmp_path / "study", tmp_path / "doc" / "study.md"
    args = ["--quiet", "study", "--preset", "ci", "--out", str(out), "--doc", str(doc), "--data-dir", str(SHARED)]
    assert main(args) == 0
    run = out / "breastmnist" / "seed0"
    summary = json.loads((run / "run_summary.json").read_text())
    for name in ("reader_only", "ft_rag", "jomed"):
        recs = read_predictions(run / "predictions" / f"{name}.jsonl")
        gold = [r.gold for r in recs]
        pred = [r.fused for r in recs]
        assert summary["systems"][name]["accuracy"]["value"] == pytest.approx(accuracy_score(gold, pred))
        assert summary["systems"][name]["macro_f1"]["value"] == pytest.approx(
            f1_score(gold, pred, labels=[0, 1], average="macro", zero_division=0)
        )
    jomed = {r.query_id: r.fused for r in read_predictions(run / "predictions" / "jomed.jsonl")}
    random = read_predictions(run / "predictions" / "jomed_random_retrieval.jsonl")
    changed = np.mean([r.fused != jomed[r.query_id] for r in random])
    assert summary["answer_changed"]["random retrieval"] == pytest.approx(changed)
    supervised = json.loads((run / "supervised.json").read_text())
    train = [json.loads(line) for line in (run / "data" / "train.jsonl").read_text().splitlines()]
    index = [json.loads(line) for line in (run / "data" / "index_records.jsonl").read_text().splitlines()]
    answers = [t["answer"] for t in train] + [r["answer"] for r in index]
    majority = int(max(("No", "Yes"), key=answers.count) == "Yes")
    assert set(supervised["majority"].values()) == {majority}
    agg = json.loads(doc.with_suffix(".json").read_text())["breastmnist"]
    assert agg["systems"]["jomed"]["accuracy"]["seeds"][0] == summary["systems"]["jomed"]["accuracy"]
    text = doc.read_text()
    assert "## breastmnist" in text and "### What holds and what does not" in text
    assert doc.with_suffix(".png").stat().st_size > 10_000
    # a rerun resumes (nothing recomputed); other settings in the same folder are refused
    stamp = (run / "run_summary.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (run / "run_summary.json").stat().st_mtime_ns == stamp
    assert (
        main(
            [
                "--quiet",
                "study",
                "--preset",
                "full",
                "--seeds",
                "0",
                "--datasets",
                "breastmnist",
                "--out",
                str(out),
                "--data-dir",
                str(SHARED),
            ]
        )
        == 2
    )


def test_the_study_presets_and_bad_options():
    from jomed_fast.study import StudyConfig

    assert PRESETS["full"].datasets == ("breastmnist", "retinamnist") and len(PRESETS["full"].seeds) == 5
    with pytest.raises(ValueError, match="--datasets: expected some of"):
        StudyConfig(datasets=("chestmnist",))
    with pytest.raises(ValueError, match="--seeds: expected distinct seeds"):
        StudyConfig(seeds=(1, 1))
    with pytest.raises(ValueError, match=r"--index-fraction: expected a share in \(0, 1\)"):
        StudyConfig(index_fraction=1.0)


def test_percent_rounding_does_not_follow_float_noise():
    """Shares of 400 queries land on exact halves of the shown digit; noise of 1e-16 (the order of
    a sum) must not change the text."""
    from jomed_fast.study.document import _pct

    for x in (0.0025, 0.1185, 0.5075, -0.0025):
        assert _pct(x, True) == _pct(x + 2e-16, True) == _pct(x - 2e-16, True)
    assert _pct(0.1234) == "12.3" and _pct(None) == "-"
