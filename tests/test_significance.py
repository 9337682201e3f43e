"""Paired significance (``analysis.significance``): McNemar against scipy's exact binomial test,
the bootstrap's point estimates against the metrics, its determinism and its coverage."""

import numpy as np
import pytest
from scipy.stats import binomtest

from jomed_fast.analysis import PredictionRecord, compare_paired, paired_bootstrap, significance_table
from jomed_fast.analysis.rerankers import mcnemar_exact
from jomed_fast.eval import prediction_metrics


def system(golds, preds, kind="multiclass"):
    return [PredictionRecord(f"q{i}", g, kind, [], p) for i, (g, p) in enumerate(zip(golds, preds))]


@pytest.mark.parametrize("only_a, only_b, both", [(0, 0, 5), (3, 0, 2), (7, 2, 10), (12, 30, 0), (1, 1, 1)])
def test_mcnemar_is_the_exact_binomial_test_on_the_discordant_pairs(only_a, only_b, both):
    a = [True] * only_a + [False] * only_b + [True] * both + [False] * 4
    b = [False] * only_a + [True] * only_b + [True] * both + [False] * 4
    want = 1.0 if only_a + only_b == 0 else binomtest(only_a, only_a + only_b, 0.5).pvalue
    assert mcnemar_exact(a, b) == pytest.approx(want, rel=1e-12)


def _case(n=300, seed=1, C=3):
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, C, n).tolist()
    pa = [g if rng.random() < 0.6 else int(rng.integers(C)) for g in gold]
    pb = [g if rng.random() < 0.75 else int(rng.integers(C)) for g in gold]
    return system(gold, pa), system(gold, pb)


def test_point_estimates_are_the_metrics_differences():
    a, b = _case()
    got = paired_bootstrap(a, b, 3, n_boot=50)
    ma, mb = prediction_metrics(a, 3), prediction_metrics(b, 3)
    assert got["accuracy"]["diff"] == pytest.approx(mb["accuracy"] - ma["accuracy"], abs=1e-12)
    assert got["macro_f1"]["diff"] == pytest.approx(mb["macro_f1"] - ma["macro_f1"], abs=1e-12)
    for m in ("accuracy", "macro_f1"):
        lo, hi = got[m]["ci"]
        assert lo <= got[m]["diff"] <= hi
    # multi-label: subset accuracy and the per-label macro-F1
    golds = [[0], [1, 2], [2], [0, 1]] * 10
    ml_a = system(golds, [[0], [1], [2], [0, 1]] * 10, "multilabel")
    ml_b = system(golds, [[0], [1, 2], [1], [1]] * 10, "multilabel")
    got = paired_bootstrap(ml_a, ml_b, 3, n_boot=20)
    ma, mb = prediction_metrics(ml_a, 3), prediction_metrics(ml_b, 3)
    assert got["accuracy"]["diff"] == pytest.approx(mb["subset_accuracy"] - ma["subset_accuracy"])
    assert got["macro_f1"]["diff"] == pytest.approx(mb["macro_f1"] - ma["macro_f1"])


def test_resampled_macro_f1_is_the_metric_of_the_resampled_queries():
    """One resample by hand: the weighted F1 equals macro-F1 over the repeated records."""
    a, b = _case(n=40, seed=3)
    rng = np.random.default_rng(7)
    idx = rng.integers(0, 40, size=(1, 40))
    got = paired_bootstrap(a, b, 3, n_boot=1, seed=7)
    ra = [PredictionRecord(f"r{j}", a[i].gold, "multiclass", [], a[i].fused) for j, i in enumerate(idx[0])]
    rb = [PredictionRecord(f"r{j}", b[i].gold, "multiclass", [], b[i].fused) for j, i in enumerate(idx[0])]
    want_f1 = prediction_metrics(rb, 3)["macro_f1"] - prediction_metrics(ra, 3)["macro_f1"]
    want_acc = prediction_metrics(rb, 3)["accuracy"] - prediction_metrics(ra, 3)["accuracy"]
    assert got["macro_f1"]["ci"] == pytest.approx([want_f1, want_f1], abs=1e-12)
    assert got["accuracy"]["ci"] == pytest.approx([want_acc, want_acc], abs=1e-12)


def test_bootstrap_is_deterministic_with_a_seed_and_pairs_by_query_id():
    a, b = _case()
    one = paired_bootstrap(a, b, 3, n_boot=400, seed=5)
    assert paired_bootstrap(a, b, 3, n_boot=400, seed=5) == one
    assert paired_bootstrap(a, list(reversed(b)), 3, n_boot=400, seed=5) == one  # matched by id, not order
    assert paired_bootstrap(a, b, 3, n_boot=400, seed=6) != one
    same = paired_bootstrap(a, a, 3, n_boot=100)
    assert same["accuracy"] == {"diff": 0.0, "ci": [0.0, 0.0]} and same["macro_f1"]["ci"] == [0.0, 0.0]


def test_bootstrap_interval_covers_the_true_difference():
    """A known population: A right with probability 0.6, B with 0.7, independently; the 95%
    interval of the accuracy difference should cover 0.1 in about 95% of 200 draws of 300 queries."""
    rng = np.random.default_rng(11)
    covered = 0
    reps = 200
    for rep in range(reps):
        gold = [0] * 300
        pa = [0 if rng.random() < 0.6 else 1 for _ in gold]
        pb = [0 if rng.random() < 0.7 else 1 for _ in gold]
        lo, hi = paired_bootstrap(system(gold, pa), system(gold, pb), 2, n_boot=300, seed=rep)["accuracy"]["ci"]
        covered += lo <= 0.1 <= hi
    assert 0.88 <= covered / reps <= 0.995


def test_significance_table_pairs_systems_and_baselines():
    a, b = _case(n=60)
    base = system([r.gold for r in a], [0] * 60)
    split = {"inconsistent": {f"q{i}" for i in range(20)}, "consistent": {f"q{i}" for i in range(20, 60)}}
    table = significance_table({"rag": a, "jomed": b}, split, 3, {"knn4_vote": base}, n_boot=50)
    assert list(table) == ["jomed vs rag", "rag vs knn4_vote", "jomed vs knn4_vote"]
    cell = table["jomed vs rag"]["inconsistent"]
    want = compare_paired(a[:20], b[:20], 3, n_boot=50)
    assert cell == want and cell["n"] == 20
    hits_a = [r.fused == r.gold for r in a]
    hits_b = [r.fused == r.gold for r in b]
    assert table["jomed vs rag"]["all"]["p_mcnemar"] == pytest.approx(mcnemar_exact(hits_b, hits_a))
    assert table["jomed vs rag"]["all"]["only_b"] == sum(y and not x for x, y in zip(hits_a, hits_b))
    with pytest.raises(ValueError, match="covers other queries"):
        significance_table({"rag": a, "jomed": b[:59]}, split, 3)
