import json

import pytest

from jomed_fast.analysis import (
    Candidate,
    PredictionRecord,
    is_inconsistent,
    metrics_table,
    oracle_accuracy,
    oracle_correct,
    read_jsonl,
    rerank_accuracy,
    rerank_fusion,
    rerank_top_confidence,
    rerank_top_image,
    rerank_top_text,
    split_consistency,
    split_metrics,
    uniform_random_records,
    write_analysis,
    write_jsonl,
)


def rec(q, gold, preds, scores, probs, fused):
    return PredictionRecord(
        q,
        gold,
        "multiclass",
        [
            Candidate(f"{q}c{i}", "text" if i % 2 == 0 else "image", s, pr, p)
            for i, (p, s, pr) in enumerate(zip(preds, scores, probs))
        ],
        fused,
    )


RECS = [
    rec("a", 0, [0, 0], [0.9, 0.1], [[0.9, 0.1], [0.8, 0.2]], 0),  # consistent, right
    rec("b", 1, [0, 1], [0.9, 0.1], [[0.6, 0.4], [0.1, 0.9]], 1),  # inconsistent, oracle ok
    rec("c", 1, [0, 0], [0.5, 0.4], [[0.7, 0.3], [0.9, 0.1]], 0),  # consistent, wrong
]


def test_roundtrip(tmp_path):
    p = str(tmp_path / "r.jsonl")
    write_jsonl(p, RECS)
    assert read_jsonl(p) == RECS


def test_split_oracle_rerank(tmp_path):
    split = split_consistency(RECS)
    assert split == {"inconsistent": {"b"}, "consistent": {"a", "c"}}
    m = split_metrics({"jomed": RECS}, split)
    assert m["share_inconsistent"] == pytest.approx(1 / 3)
    assert m["systems"]["jomed"] == {"all": pytest.approx(2 / 3), "inconsistent": 1.0, "consistent": 0.5}
    assert oracle_accuracy(RECS) == pytest.approx(2 / 3)
    acc = rerank_accuracy(
        RECS,
        {
            "top1": rerank_top_text,
            "top1_image": rerank_top_image,
            "conf": rerank_top_confidence,
            "fusion": rerank_fusion,
            "last": lambda r: len(r.candidates) - 1,
        },
    )
    assert acc == {
        "top1": pytest.approx(1 / 3),
        "top1_image": pytest.approx(2 / 3),
        "conf": pytest.approx(2 / 3),
        "fusion": pytest.approx(2 / 3),
        "last": pytest.approx(2 / 3),
    }
    paths = write_analysis(str(tmp_path), "rerank", {"jomed": acc})
    assert json.load(open(paths["json"]))["table"]["jomed"]["top1"] == pytest.approx(1 / 3)
    assert "| jomed |" in open(paths["md"]).read()


def test_bad_input():
    with pytest.raises(ValueError, match="kind"):
        PredictionRecord("x", 0, "nope", [], 0)
    with pytest.raises(ValueError, match="rerankers"):
        rerank_accuracy(RECS, {"bad": lambda r: 9})


def test_multilabel_and_open():
    ml = PredictionRecord(
        "m", [1, 2], "multilabel", [Candidate("x", "text", 1.0, [], [2, 1]), Candidate("y", "image", 0.5, [], [1])], [1]
    )
    assert is_inconsistent(ml) and oracle_correct(ml)
    op = PredictionRecord(
        "o",
        "The left lung",
        "vqa_open",
        [Candidate("x", "text", 1.0, [], "left lung."), Candidate("y", "text", 0.2, [], "Left Lung")],
        "heart",
    )
    assert not is_inconsistent(op) and oracle_correct(op)


def test_split_macro_f1_matches_sklearn():
    from sklearn.metrics import f1_score

    from jomed_fast.eval import prediction_metrics

    rng = __import__("numpy").random.default_rng(0)
    recs = []
    for i in range(40):
        preds = [int(x) for x in rng.integers(0, 3, size=3)]
        recs.append(
            rec(f"q{i}", int(rng.integers(0, 3)), preds, [0.5, 0.3, 0.2], [[1 / 3] * 3] * 3, int(rng.integers(0, 3)))
        )
    split = split_consistency(recs)
    m = split_metrics({"s": recs}, split, metric="macro_f1")
    for name in ("all", "inconsistent", "consistent"):
        rs = [r for r in recs if name == "all" or r.query_id in split[name]]
        want = f1_score([r.gold for r in rs], [r.fused for r in rs], average="macro", labels=[0, 1, 2], zero_division=0)
        assert m["systems"]["s"][name] == pytest.approx(want)
    full = prediction_metrics(recs)
    assert full["n"] == 40 and full["macro_f1"] == pytest.approx(m["systems"]["s"]["all"])
    first = prediction_metrics(recs, which="candidate", candidate=0)
    assert first["accuracy"] == pytest.approx(sum(r.candidates[0].prediction == r.gold for r in recs) / 40)
    with pytest.raises(ValueError, match="metric:"):
        split_metrics({"s": recs}, split, metric="auc")
    with pytest.raises(ValueError, match="records: expected one task kind"):
        prediction_metrics([recs[0], PredictionRecord("z", [0], "multilabel", [], [0])])


def test_uniform_random_classifier_and_metrics_table():
    recs = [rec(f"q{i}", i % 3, [0, 1], [0.5, 0.5], [[0.5, 0.3, 0.2]] * 2, i % 3) for i in range(3000)]
    rand = uniform_random_records(recs, 3, seed=1)
    assert rand == uniform_random_records(recs, 3, seed=1) and rand != uniform_random_records(recs, 3, seed=2)
    table = metrics_table({"perfect": recs, "random": rand}, num_classes=3)
    assert table["perfect"] == {"accuracy": 1.0, "macro_f1": 1.0}
    assert table["random"]["accuracy"] == pytest.approx(1 / 3, abs=0.03)  # chance
    ml = [PredictionRecord(f"m{i}", [0], "multilabel", [], [0]) for i in range(2000)]
    picks = [frozenset(r.fused) for r in uniform_random_records(ml, 2, seed=0)]
    assert all(picks) and {frozenset({0}), frozenset({1}), frozenset({0, 1})} == set(picks)
    with pytest.raises(ValueError, match="num_classes"):
        uniform_random_records(recs, 0)
