"""Retrieval-only baselines (``analysis.baselines``): the kNN vote over the base retriever's records
and each system's candidate vote, against hand-made cases (ties included) and a brute force."""

import math
import random
from collections import Counter

import pytest

from jomed_fast.analysis import (
    Candidate,
    PredictionRecord,
    candidate_vote_records,
    index_labels,
    knn_vote_records,
    vote,
)
from jomed_fast.data.records import IndexRecord
from jomed_fast.tasks import get_task


def rec(q, gold, cands, kind="multiclass"):
    """``cands``: (record id, head, score) in stored order."""
    return PredictionRecord(q, gold, kind, [Candidate(i, h, s, [], 0) for i, h, s in cands], 0)


LABELS = {"r0": 0, "r1": 1, "r2": 2, "r3": 1, "r4": 0, "rx": None}


def test_vote_majority_and_its_tie_break():
    assert vote([2, 1, 1], False) == 1  # majority
    assert vote([2, 1, 1, 2], False) == 2  # 2-2 tie: the label of the nearest voter
    assert vote([1, 2, 2, 1], False) == 1
    assert vote([None, 3, None], False) == 3  # null records abstain
    assert vote([None, None], False) is None
    # multi-label: a label when at least half the (non-abstaining) voters carry it
    sets = [frozenset({0, 1}), frozenset({1}), frozenset({2}), frozenset({1, 2})]
    assert vote(sets, True) == [1, 2]  # 1: 3/4, 2: 2/4 (= 0.5 counts), 0: 1/4
    assert vote([frozenset({0}), None, frozenset({0, 3})], True) == [0, 3]  # 3: 1/2 of the two voters


def test_knn_vote_by_hand_with_ties():
    # heads compare by their own softmax: text (2.0, 1.0) -> 0.73, 0.27; image (5.0, 5.0) -> 0.5, 0.5
    q = rec("q", 1, [("r2", "image", 5.0), ("r0", "text", 1.0), ("r1", "text", 2.0), ("r4", "image", 5.0)])
    # rank: r1 (0.73), r2 (0.5, stored first), r4 (0.5), r0 (0.27); labels 1, 2, 0, 0
    got = {k: knn_vote_records([q], LABELS, k)[0].fused for k in (1, 2, 3, 4)}
    # k=2: 1 vs 2 tie -> r1's label; k=3: three-way tie -> r1's; k=4: 0 twice wins
    assert got == {1: 1, 2: 1, 3: 1, 4: 0}
    out = knn_vote_records([q], LABELS, 4)[0]
    assert out.candidates == [] and out.fused_probs is None and out.gold == 1 and out.query_id == "q"


def test_candidate_vote_uses_every_candidate_and_the_prior_when_all_abstain():
    a = rec("a", 0, [("r1", "text", 0.9), ("r3", "text", 0.1), ("r0", "image", 0.3)])
    b = rec("b", 2, [("rx", "text", 0.9), ("rx", "image", 0.1)])  # all voters null
    got = candidate_vote_records([a, b], LABELS)
    assert got[0].fused == 1  # two of three say 1
    # the index prior: the vote over every labelled record in id order: 0 (r0, r4) and 1 (r1, r3)
    # tie, r0 comes first -> 0
    assert got[1].fused == 0


def _brute_force_knn(r, labels, k):
    """Independent: every head's softmax by hand, rank by (-pi, position), Counter, tie by rank."""
    pi = []
    for c in r.candidates:
        same = [d.score for d in r.candidates if d.head == c.head]
        pi.append(math.exp(c.score) / sum(math.exp(s) for s in same))
    order = sorted(range(len(pi)), key=lambda j: (-pi[j], j))[:k]
    ys = [labels[r.candidates[j].id] for j in order if labels[r.candidates[j].id] is not None]
    if not ys:
        return None
    counts = Counter(ys)
    best = max(counts.values())
    return next(y for y in ys if counts[y] == best)


def test_knn_vote_against_a_brute_force():
    rng = random.Random(0)
    labels = {f"r{i}": rng.choice([0, 1, 2, None]) for i in range(12)}
    labels["r0"] = 1  # the prior exists
    queries = []
    for q in range(200):
        cands = [
            (f"r{rng.randrange(12)}", rng.choice(["text", "image"]), rng.choice([0.1, 0.5, 0.9, 1.3]))
            for _ in range(rng.randrange(3, 7))
        ]
        queries.append(rec(f"q{q}", 0, cands))
    for k in (1, 2, 3):
        got = knn_vote_records(queries, labels, k)
        prior = vote([labels[i] for i in sorted(labels)], False)
        for r, g in zip(queries, got):
            want = _brute_force_knn(r, labels, k)
            assert g.fused == (prior if want is None else want), (r.query_id, k)


def test_multilabel_votes_per_label():
    a = rec("a", [1], [("m0", "text", 1.0), ("m1", "text", 0.0), ("m2", "image", 0.0)], "multilabel")
    labels = {"m0": frozenset({0, 1}), "m1": frozenset({1}), "m2": frozenset({2, 1})}
    assert knn_vote_records([a], labels, 3)[0].fused == [1]
    # k=2: m0 and m2 (the image head's only record, pi = 1): 0, 1 and 2 each at least half
    assert knn_vote_records([a], labels, 2)[0].fused == [0, 1, 2]


def test_index_labels_from_label_answer_and_meta_keys():
    task = get_task("derma")
    records = [
        IndexRecord("a", None, "t", extra={"label": 3}),
        IndexRecord("b", None, "t", extra={"answer": task.labels[5]}),
        IndexRecord("c", None, "t", extra={"meta": {"label": 2, "kind": "relevant"}}),
        IndexRecord("d", None, "t", extra={"meta": {"label": None}}),
        IndexRecord("e", None, "t"),  # no label: left out
    ]
    assert index_labels(records, task) == {"a": 3, "b": 5, "c": 2, "d": None}
    with pytest.raises(ValueError, match="record 'z': 'label': expected a class index in 0..6, got 9"):
        index_labels([IndexRecord("z", None, "t", extra={"label": 9})], task)
    ml = get_task("vindr_pcxr")
    assert index_labels([IndexRecord("m", None, "t", extra={"label": [0, 4]})], ml) == {"m": frozenset({0, 4})}


def test_refusals_name_the_record_and_the_option():
    q = rec("q", 0, [("r0", "text", 1.0), ("nope", "image", 1.0)])
    with pytest.raises(ValueError, match="candidate 'nope' of query 'q' has no label"):
        candidate_vote_records([q], LABELS)
    with pytest.raises(ValueError, match="--knn-k: 3 neighbours asked, but query 'q' has 2 candidates"):
        knn_vote_records([q], LABELS, 3)
    with pytest.raises(ValueError, match="--knn-k: expected an int >= 1"):
        knn_vote_records([q], LABELS, 0)
    with pytest.raises(ValueError, match="no record carries a class label"):
        knn_vote_records([q], {"r0": None}, 1)


def test_a_run_without_retrieval_has_no_vote_and_no_baseline_row():
    from jomed_fast.analysis import retrieval_baselines

    rag = [rec("q", 1, [("r1", "text", 1.0), ("r0", "image", 1.0)])]
    none = [rec("q", 1, [("-", "none", 0.0)])]  # predict's placeholder with --retrieval none
    with pytest.raises(ValueError, match="a run without retrieval has no index records to vote"):
        candidate_vote_records(none, LABELS)
    rows = retrieval_baselines({"reader_only": none, "rag": rag}, LABELS, "rag", 2)
    assert list(rows) == ["knn2_vote", "rag_candidate_vote"] and rows["knn2_vote"][0].fused == 1
    with pytest.raises(ValueError, match="a run without retrieval"):
        retrieval_baselines({"reader_only": none, "rag": rag}, LABELS, "reader_only", 1)
