"""The top-1 candidate is per retrieval head, one definition in ``evaluate`` and ``analyze``: each
head's highest-scoring candidate (never an argmax of scores across heads, which live on different
scales), checked against a brute force over the records and through both commands on one file."""

import json

import numpy as np
import pytest

from jomed_fast.analysis import Candidate, PredictionRecord, head_top1, head_top1_metrics, write_jsonl
from jomed_fast.cli import main
from jomed_fast.eval.metrics import macro_f1

C = 3


def _records(n=40, seed=0):
    """Queries with 2 text and 3 image candidates in random order; the image head's scores are on
    a larger scale (as cosine image-image similarities against image-caption ones), so a cross-head
    argmax would always pick an image candidate."""
    rng = np.random.default_rng(seed)
    out = []
    for q in range(n):
        heads = rng.permutation(["text", "text", "image", "image", "image"])
        cands = []
        for k, h in enumerate(heads):
            score = float(rng.uniform(0.1, 0.3) if h == "text" else rng.uniform(0.7, 0.9))
            probs = rng.dirichlet(np.ones(C))
            cands.append(Candidate(f"q{q}c{k}", str(h), score, [float(p) for p in probs], int(probs.argmax())))
        fused = int(rng.integers(C))
        out.append(PredictionRecord(f"q{q}", int(rng.integers(C)), "multiclass", cands, fused, [1 / C] * C))
    return out


def _brute_force_pick(record, head):
    scores = [c.score if c.head == head else -np.inf for c in record.candidates]
    return int(np.argmax(scores)) if np.isfinite(max(scores)) else None


def test_head_top1_is_the_best_candidate_of_that_head():
    records = _records()
    for r in records:
        for head in ("text", "image"):
            k = head_top1(r, head)
            assert k == _brute_force_pick(r, head) and r.candidates[k].head == head
    for head in ("text", "image"):
        got = head_top1_metrics(records, head)
        preds = [r.candidates[_brute_force_pick(r, head)].prediction for r in records]
        golds = [r.gold for r in records]
        assert got["n"] == len(records)
        assert got["accuracy"] == pytest.approx(np.mean([p == g for p, g in zip(preds, golds)]))
        assert got["macro_f1"] == pytest.approx(macro_f1(preds, golds, C))
    text_only = [
        PredictionRecord(r.query_id, r.gold, r.kind, [c for c in r.candidates if c.head == "text"], r.fused)
        for r in records
    ]
    assert head_top1_metrics(text_only, "image") is None  # no image candidate anywhere: n/a, not 0
    with pytest.raises(ValueError, match=r"head: expected one of \('text', 'image'\), got 'both'"):
        head_top1(records[0], "both")


def test_evaluate_and_analyze_report_the_same_top1_per_head(tmp_path, capsys):
    records = _records()
    path = tmp_path / "preds.jsonl"
    write_jsonl(str(path), records)
    assert main(["evaluate", "--predictions", str(path), "--out", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert main(["analyze", "--system", f"rag={path}", "--out", str(tmp_path / "report")]) == 0
    capsys.readouterr()
    rows = json.loads((tmp_path / "report" / "rerank.json").read_text())["table"]["rag"]
    table = {name: row["all"]["accuracy"] for name, row in rows.items()}  # Table 8 over every query
    for head in ("text", "image"):
        want = np.mean([r.candidates[_brute_force_pick(r, head)].prediction == r.gold for r in records])
        assert metrics[f"top1_{head}"]["accuracy"] == pytest.approx(want)
        assert table[f"top1_retrieval_{head}"] == pytest.approx(metrics[f"top1_{head}"]["accuracy"])
    # the text head's top-1 is not what a cross-head argmax of raw scores picks
    cross = np.mean(
        [r.candidates[int(np.argmax([c.score for c in r.candidates]))].prediction == r.gold for r in records]
    )
    assert cross == pytest.approx(table["top1_retrieval_image"]) and table["top1_retrieval_text"] != pytest.approx(
        cross
    )
