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


def test_split_oracle(tmp_path):
    split = split_consistency(RECS)
    assert split == {"inconsistent": {"b"}, "consistent": {"a", "c"}}
    m = split_metrics({"jomed": RECS}, split)
    assert m["share_inconsistent"] == pytest.approx(1 / 3)
    assert m["systems"]["jomed"] == {"all": pytest.approx(2 / 3), "inconsistent": 1.0, "consistent": 0.5}
    assert oracle_accuracy(RECS) == pytest.approx(2 / 3)
    paths = write_analysis(str(tmp_path), "split", {"jomed": m["systems"]["jomed"]})
    assert json.load(open(paths["json"]))["table"]["jomed"]["consistent"] == pytest.approx(0.5)
    assert "| jomed |" in open(paths["md"]).read()


def test_bad_input():
    with pytest.raises(ValueError, match="kind"):
        PredictionRecord("x", 0, "nope", [], 0)


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


# ------------------------------------------------------------------------------ analyze, end to end
# Index records r0..r5 of the retina task (5 grades): r0, r1 grade 0; r2, r3 grade 1; r4 grade 2;
# r5 of no class (null label: abstains).
INDEX_LABELS = {"r0": 0, "r1": 0, "r2": 1, "r3": 1, "r4": 2, "r5": None}


def _retina(q, gold, cands, fused):
    """``cands``: (record id, head, score, prediction); uniform posteriors except the prediction's."""

    def probs(p):
        return [0.6 if c == p else 0.1 for c in range(5)]

    return PredictionRecord(
        q, gold, "multiclass", [Candidate(i, h, s, probs(p), p) for i, h, s, p in cands], fused, probs(fused)
    )


# rag (the base retriever): its kNN vote over 4 candidates, worked out by hand in KNN4 / KNN2
RAG = [
    _retina(
        "q0", 0, [("r0", "text", 0.9, 0), ("r2", "text", 0.1, 1), ("r1", "image", 0.8, 0), ("r4", "image", 0.2, 2)], 0
    ),
    _retina(
        "q1", 1, [("r2", "text", 0.9, 1), ("r0", "text", 0.1, 0), ("r3", "image", 0.8, 1), ("r1", "image", 0.2, 0)], 0
    ),
    _retina(
        "q2", 2, [("r4", "text", 0.9, 2), ("r5", "text", 0.1, 2), ("r0", "image", 0.8, 0), ("r4", "image", 0.2, 2)], 2
    ),
    _retina(
        "q3", 1, [("r1", "text", 0.9, 0), ("r3", "text", 0.1, 1), ("r2", "image", 0.8, 1), ("r0", "image", 0.2, 0)], 1
    ),
    _retina(
        "q4", 0, [("r5", "text", 0.9, 3), ("r5", "text", 0.1, 3), ("r5", "image", 0.8, 3), ("r5", "image", 0.2, 3)], 3
    ),
    _retina(
        "q5", 2, [("r3", "text", 0.9, 1), ("r4", "text", 0.1, 2), ("r4", "image", 0.8, 2), ("r0", "image", 0.2, 0)], 1
    ),
]
# k = 4 by hand (rank: text 0.9 and image 0.8 first, ties by stored order):
# q0 0,1,0,2 -> 0; q1 1,0,1,0 tie -> 1 (nearest); q2 2,-,0,2 -> 2; q3 0,1,1,0 tie -> 0 (nearest is r1);
# q4 all abstain -> the prior (0 and 1 twice each, r0 first by id) 0; q5 1,2,2,0 -> 2
KNN4 = [0, 1, 2, 0, 0, 2]
# k = 2 (the two heads' top records): q0 0,0 -> 0; q1 1,1 -> 1; q2 2,0 -> 2; q3 0,1 -> 0; q4 -> 0; q5 1,2 -> 1
KNN2 = [0, 1, 2, 0, 0, 1]
JOMED = [
    _retina(r.query_id, r.gold, [(f"r{2 * r.gold}", "text", 0.9, r.gold), ("r5", "image", 0.5, 3)], f)
    for r, f in zip(RAG, [0, 1, 2, 1, 0, 2])
]


def _analyze_workspace(tmp_path, labelled=True):
    write_jsonl(str(tmp_path / "rag.jsonl"), RAG)
    write_jsonl(str(tmp_path / "jomed.jsonl"), JOMED)
    rows = [
        {"id": i, "image_path": f"{i}.png", "text": "t", **({"label": y} if labelled else {})}
        for i, y in INDEX_LABELS.items()
    ]
    (tmp_path / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [
        "analyze", "--system", f"rag={tmp_path / 'rag.jsonl'}", f"jomed={tmp_path / 'jomed.jsonl'}",
        "--out", str(tmp_path / "report"), "--task", "retina", "--index-records", str(tmp_path / "index.jsonl"),
        "--bootstrap", "300",
    ]  # fmt: skip


def test_analyze_writes_baselines_significance_and_the_oracle_f1(tmp_path, capsys):
    from scipy.stats import binomtest

    from jomed_fast.analysis import oracle_f1
    from jomed_fast.cli import main

    argv = _analyze_workspace(tmp_path)
    assert main(argv) == 0
    out = capsys.readouterr().out
    report = tmp_path / "report"
    acc = json.loads((report / "consistency_accuracy.json").read_text())["table"]
    golds = [r.gold for r in RAG]
    assert acc["knn4_vote"]["all"] == pytest.approx(sum(p == g for p, g in zip(KNN4, golds)) / 6)
    # rag's candidate vote is its kNN vote over all 4; jomed's: its text record (the gold's) beside a null
    assert acc["rag_candidate_vote"] == acc["knn4_vote"] and acc["jomed_candidate_vote"]["all"] == 1.0
    assert set(acc) == {"rag", "jomed", "knn4_vote", "rag_candidate_vote", "jomed_candidate_vote"}
    assert "knn4_vote" not in json.loads((report / "consistency_split.json").read_text())["table"]
    # the oracle: printed and written, F1 beside accuracy
    oracle = json.loads((report / "oracle.json").read_text())["table"]
    assert oracle["rag"]["oracle_f1"] == pytest.approx(oracle_f1(RAG, 5))
    assert oracle["rag"]["oracle_accuracy"] == pytest.approx(5 / 6)  # q4 has no right candidate
    assert f"oracle accuracy {100 * 5 / 6:.1f}  oracle F1 {100 * oracle_f1(RAG, 5):.1f}" in out
    # significance: every system pair and every system against every baseline, McNemar as scipy's
    written = json.loads((report / "significance.json").read_text())
    sig = written["table"]
    assert written["comparisons"][0] == "jomed vs rag" and len(sig) == 1 + 2 * 3
    cell = sig["jomed vs rag"]["all"]
    hits_rag = [r.fused == r.gold for r in RAG]
    hits_jomed = [r.fused == r.gold for r in JOMED]
    only_b = sum(y and not x for x, y in zip(hits_rag, hits_jomed))
    only_a = sum(x and not y for x, y in zip(hits_rag, hits_jomed))
    assert (cell["only_a"], cell["only_b"]) == (only_a, only_b)
    assert cell["p_mcnemar"] == pytest.approx(binomtest(only_b, only_a + only_b, 0.5).pvalue)
    assert cell["diff_accuracy"] == pytest.approx((sum(hits_jomed) - sum(hits_rag)) / 6)
    md = (report / "significance.md").read_text()
    assert "| JOMED vs RAG | all | +50.0 [" in md and "300 resamples, seed 0" in md
    first = (report / "significance.json").read_text()
    # the same seed, the same intervals; --knn-k 2 votes over each head's top record
    assert main([*argv, "--knn-k", "2"]) == 0
    capsys.readouterr()
    acc = json.loads((report / "consistency_accuracy.json").read_text())["table"]
    assert acc["knn2_vote"]["all"] == pytest.approx(sum(p == g for p, g in zip(KNN2, golds)) / 6)
    assert (
        json.loads((report / "significance.json").read_text())["table"]["jomed vs rag"]
        == json.loads(first)["table"]["jomed vs rag"]
    )


def test_analyze_baselines_refusals_and_notes(tmp_path, capsys):
    from jomed_fast.cli import main

    argv = _analyze_workspace(tmp_path)
    for extra, message in [
        (["--knn-k", "5"], "--knn-k: 5 neighbours asked, but query 'q0' has 4 candidates"),
        (["--knn-from", "nope"], "--knn-from: expected one of ['jomed', 'rag'], got 'nope'"),
        (["--knn-from", "jomed"], "--knn-k: 4 neighbours asked, but query 'q0' has 2 candidates"),
        (["--bootstrap", "0"], "--bootstrap: expected at least 1 resample"),
    ]:
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "report").exists()  # refused before anything is written
    assert main([*argv, "--no-baselines"]) == 0
    assert "knn4_vote" not in json.loads((tmp_path / "report" / "consistency_accuracy.json").read_text())["table"]
    capsys.readouterr()
    (tmp_path / "plain").mkdir()
    unlabelled = _analyze_workspace(tmp_path / "plain", labelled=False)
    assert main(unlabelled) == 0
    assert "baselines: none (no record of" in capsys.readouterr().out
