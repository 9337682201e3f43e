"""Table 8 against brute force on small synthetic prediction records: the picks, the splits, the
cells' accuracy and n, the Wilson interval and the McNemar test (both against scipy), and the
written JSON / markdown / PNG."""

import json
import math

import numpy as np
import pytest
from scipy.stats import binomtest

from jomed_fast.analysis import Candidate, PredictionRecord, rerank_table, wilson_interval, write_rerank_tables
from jomed_fast.analysis.rerankers import (
    mcnemar_exact,
    rerank_top_confidence,
    rerank_top_retrieval,
    rerank_top_retrieval_in_head,
    rerankers_for,
)


def synthetic_records(n=60, c=3, seed=0, heads=("text", "text", "image", "image")):
    """Records whose heads score on different scales (text near 0.9, image near 0.3); about 40%
    of the queries' candidates agree (each one's posterior peaks on the query's class ``base``)."""
    rng = np.random.default_rng(seed)
    recs = []
    for q in range(n):
        cands = []
        agree, base = rng.random() < 0.4, int(rng.integers(c))
        for k, head in enumerate(heads):
            probs = rng.dirichlet(np.ones(c)) + (np.eye(c)[base] if agree else 0.0)
            probs = (probs / probs.sum()).tolist()
            score = float((0.9 if head == "text" else 0.3) + 0.05 * rng.standard_normal())
            cands.append(Candidate(f"q{q}c{k}", head, score, probs, int(np.argmax(probs))))
        recs.append(PredictionRecord(f"q{q}", int(rng.integers(c)), "multiclass", cands, int(rng.integers(c))))
    return recs


def brute_pick_within_head(rec):
    best, best_p = None, -1.0
    for k, cand in enumerate(rec.candidates):
        same = [c.score for c in rec.candidates if c.head == cand.head]
        p = math.exp(cand.score) / sum(math.exp(s) for s in same)
        if p > best_p:
            best, best_p = k, p
    return best


def brute_pick_head(rec, head):
    ks = [k for k, c in enumerate(rec.candidates) if c.head == head]
    best = ks[0]
    for k in ks:
        if rec.candidates[k].score > rec.candidates[best].score:
            best = k
    return best


def brute_pick_confidence(rec):
    confidence = [max(c.probs) for c in rec.candidates]
    return confidence.index(max(confidence))


def test_picks_match_brute_force():
    for rec in synthetic_records():
        assert rerank_top_retrieval(rec) == brute_pick_within_head(rec)
        assert rerank_top_retrieval_in_head("text")(rec) == brute_pick_head(rec, "text")
        assert rerank_top_retrieval_in_head("image")(rec) == brute_pick_head(rec, "image")
        assert rerank_top_confidence(rec) == brute_pick_confidence(rec)


def test_top1_across_heads_reads_each_head_on_its_own_scale():
    """Raw scores would always pick the text head (its scale is higher); each head's own softmax
    picks the image candidate when its head ranks it more clearly."""
    rec = PredictionRecord(
        "q",
        1,
        "multiclass",
        [
            Candidate("t0", "text", 0.90, [0.6, 0.4], 0),
            Candidate("t1", "text", 0.89, [0.6, 0.4], 0),
            Candidate("i0", "image", 0.30, [0.4, 0.6], 1),
            Candidate("i1", "image", 0.10, [0.4, 0.6], 1),
        ],
        1,
    )
    assert int(np.argmax([c.score for c in rec.candidates])) == 0
    assert rerank_top_retrieval(rec) == 2
    assert rerank_top_retrieval_in_head("text")(rec) == 0


def brute_cell(recs, pick_of):
    hits = [(pick_of(r) is not None and r.candidates[pick_of(r)].prediction == r.gold) for r in recs]
    return sum(hits), len(hits)


def test_table_matches_brute_force_per_split():
    recs = synthetic_records()
    table = rerank_table(recs)
    inconsistent = [r for r in recs if len({c.prediction for c in r.candidates}) > 1]
    consistent = [r for r in recs if len({c.prediction for c in r.candidates}) == 1]
    assert inconsistent and consistent
    parts = {"inconsistent": inconsistent, "consistent": consistent, "all": recs}
    brute = {
        "top1_retrieval": brute_pick_within_head,
        "top1_retrieval_text": lambda r: brute_pick_head(r, "text"),
        "top1_retrieval_image": lambda r: brute_pick_head(r, "image"),
        "top1_confidence": brute_pick_confidence,
    }
    assert list(table) == [*brute, "fusion", "oracle"]
    for split, rs in parts.items():
        fused = [r.fused == r.gold for r in rs]
        for name, pick_of in brute.items():
            hits, n = brute_cell(rs, pick_of)
            cell = table[name][split]
            assert (cell["hits"], cell["n"]) == (hits, n), (name, split)
            assert cell["accuracy"] == pytest.approx(hits / n)
            assert cell["no_choice"] == 0
            picked = [r.candidates[pick_of(r)].prediction == r.gold for r in rs]
            b = sum(p and not f for p, f in zip(picked, fused))
            c = sum(f and not p for p, f in zip(picked, fused))
            want = 1.0 if b + c == 0 else binomtest(min(b, c), b + c, 0.5).pvalue
            assert cell["p_vs_fusion"] == pytest.approx(want, rel=1e-9), (name, split)
        assert table["fusion"][split]["hits"] == sum(fused)
        assert table["oracle"][split]["hits"] == sum(any(c.prediction == r.gold for c in r.candidates) for r in rs)
    # on consistent queries every candidate says the same: every pick scores alike
    assert len({table[name]["consistent"]["hits"] for name in brute}) == 1


def test_given_split_and_picks_with_no_choice():
    recs = synthetic_records(n=12)
    split = {"inconsistent": {"q0", "q1", "q2"}, "consistent": {r.query_id for r in recs} - {"q0", "q1", "q2"}}
    picks = {"lvlm": {"q0": 1, "q1": None, "q2": 3}}  # q1: a reply that named no valid candidate
    table = rerank_table(recs, {}, picks, split)
    cell = table["lvlm"]["inconsistent"]
    want = sum(recs[q].candidates[k].prediction == recs[q].gold for q, k in ((0, 1), (2, 3)))
    assert (cell["hits"], cell["n"], cell["no_choice"]) == (want, 3, 1)
    assert table["lvlm"]["consistent"] is None and table["lvlm"]["all"] is None  # not picked there
    assert table["oracle"]["inconsistent"]["n"] == 3
    with pytest.raises(ValueError, match=r"lvlm pick: expected a candidate index in 0\.\.3 or None for query 'q0'"):
        rerank_table(recs, {}, {"lvlm": {"q0": 4, "q1": 0, "q2": 0}}, split)
    with pytest.raises(ValueError, match="each row name once"):
        rerank_table(recs, {}, {"fusion": {}}, split)


def test_per_head_rows_only_for_heads_present():
    recs = synthetic_records(n=4, heads=("text", "text"))
    assert list(rerankers_for(recs)) == ["top1_retrieval", "top1_retrieval_text", "top1_confidence"]


@pytest.mark.parametrize("hits, n", [(0, 1), (1, 1), (3, 7), (16, 20), (0, 40), (57, 113)])
def test_wilson_interval_matches_scipy(hits, n):
    ci = binomtest(hits, n).proportion_ci(0.95, method="wilson")
    assert wilson_interval(hits, n) == pytest.approx((ci.low, ci.high), abs=1e-12)
    with pytest.raises(ValueError, match="hits, n"):
        wilson_interval(n + 1, n)


def test_mcnemar_matches_scipy():
    rng = np.random.default_rng(1)
    for _ in range(20):
        a, b = rng.random(30) < 0.6, rng.random(30) < 0.4
        only_a, only_b = int(np.sum(a & ~b)), int(np.sum(b & ~a))
        want = binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue
        assert mcnemar_exact(a.tolist(), b.tolist()) == pytest.approx(want, rel=1e-9)


def test_written_tables(tmp_path):
    recs = synthetic_records(n=20)
    tables = {"jomed": rerank_table(recs), "ft_rag": rerank_table(synthetic_records(n=20, seed=3))}
    paths = write_rerank_tables(str(tmp_path), tables)
    assert json.loads(open(paths["json"]).read())["table"] == json.loads(json.dumps(tables))
    md = open(paths["md"]).read()
    cell = tables["jomed"]["top1_confidence"]["inconsistent"]
    lo, hi = cell["ci95"]
    text = f"{100 * cell['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] n={cell['n']}"
    assert f"| top-1 confidence | {text}" in md and "#### JOMED" in md and "Wilson" in md
    assert open(paths["png"], "rb").read()[:8] == b"\x89PNG\r\n\x1a\n"
