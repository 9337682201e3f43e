"""Stage 2's diagnostics, warnings and candidate de-duplication, against independent references.

Entropies and gradient norms against float64 formulas and the loop's own logged norms, distinct
records and per-class coverage against brute force, de-duplication against a walk down the full
ranked list, the flat-target warning on an index of copies (and not on the synthetic one), the
collapse warning when its threshold is forced, and the result's fields.
"""

import copy
import dataclasses
import json
import math

import _stage2_worker as W
import numpy as np
import pytest
import torch
from _stage2_settings import FAST as _FAST

from jomed_fast.analysis.figures import stage2_diagnostics_chart
from jomed_fast.candidate_retrieval import Retrieval
from jomed_fast.index import Index
from jomed_fast.retriever import QueryEncoder
from jomed_fast.train.candidate_dedup import first_distinct
from jomed_fast.train.retriever import RetrieverTrainConfig, train_retriever
from jomed_fast.train.retriever_diagnostics import distinct_records, entropy, grad_norm, per_class_distinct
from jomed_fast.train.retriever_model import HeadModel

pytestmark = [pytest.mark.usefixtures("one_thread")]

FAST = {**_FAST, "k": 6, "layout": "shared_query"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return W.load(W.build(tmp_path_factory.mktemp("diag")))


def _retrieval_over(records, enc, path):
    Index.build(records, enc, path, batch_size=len(records), chunk_size=len(records), progress=False)
    return Retrieval(Index.open(path), records)


# --------------------------------------------------------------------------------------- pure
def test_entropy_and_grad_norm_match_float64_references():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, -1.0, 0.5, 0.0]])
    for tau in (1.0, 0.3):
        got = entropy(logits, tau)
        for b in range(2):
            z = np.exp(logits[b].numpy().astype(np.float64) / tau)
            p = z / z.sum()
            assert float(got[b]) == pytest.approx(-(p * np.log(p)).sum(), rel=1e-12)
    assert float(entropy(logits, 1.0)[0]) == pytest.approx(math.log(4))  # uniform: log K
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(2, 2))
    c = torch.nn.Parameter(torch.zeros(1))  # no gradient: left out
    (a * torch.tensor([3.0, 0.0, 4.0])).sum().backward()
    (b * 2.0).sum().backward()
    assert grad_norm([a, b, c]) == pytest.approx(math.sqrt(9 + 16 + 4 * 4), rel=1e-12)
    assert grad_norm([c]) == 0.0


def test_distinct_records_and_coverage_match_brute_force():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 30, size=(40, 3))
    labels = torch.tensor(rng.integers(0, 4, size=40))
    assert distinct_records(ids.tolist()) == len(np.unique(ids))
    got = per_class_distinct(ids.tolist(), labels)
    for c in range(4):
        assert got[str(c)] == len(np.unique(ids[labels.numpy() == c])), c
    sets = torch.tensor([[1, 0, 1], [1, 0, 1], [0, 1, 0]], dtype=torch.bool)
    assert per_class_distinct([[1, 2], [2, 3], [9, 9]], sets) == {"(0, 2)": 3, "(1,)": 1}


def test_first_distinct_keeps_the_first_of_each_and_fills_with_copies_when_short():
    key = {0: "a", 1: "a", 2: "b", 3: "a", 4: "c", 5: "b"}.__getitem__
    pos, removed, kept, short = first_distinct([[0, 1, 2, 3, 4, 5]], key, 3)
    assert pos == [[0, 2, 4]] and removed == 1 and kept == 0 and short == 0  # rank 1 ("a") replaced
    pos, removed, kept, short = first_distinct([[0, 1, 3, 2]], key, 3)
    assert pos == [[0, 1, 3]] and kept == 1 and short == 1  # 2 distinct: the best copy fills the third slot


# --------------------------------------------------------------------------------------- dedup
def _full_ranking(model, images, samples):
    """The head's whole ranked list (own rows left out), searched without de-duplication."""
    n = model.retrieval.index.count
    plain = HeadModel(model.config.replace(dedup_candidates=False, k=n - 1), model.encoder, model.retrieval, None)
    return plain.candidates(images, samples).ids.tolist()


@pytest.mark.parametrize("head", ["text", "image"])
def test_dedup_keeps_k_and_the_first_of_each_content(setup, tmp_path, head):
    reader, enc, retrieval, train, _ = setup
    recs = list(retrieval.records)
    if head == "image":  # the second half: the first half's images under other captions
        recs = recs[:48] + [dataclasses.replace(r, id=f"{r.id}-copy", text=r.text + " again") for r in recs[:48]]
        retrieval = _retrieval_over(recs, enc, tmp_path / "index")
    assert len({r.text for r in recs}) < len(recs) or head == "image"
    cfg = RetrieverTrainConfig(**{**FAST, "k": 10}, head=head)
    model = HeadModel(cfg, QueryEncoder(copy.deepcopy(enc), cfg.n_trainable, cfg.alpha), retrieval, None)
    samples = train[:8]
    images = [s.image for s in samples]
    got = model.candidates(images, samples)
    full = _full_ranking(model, images, samples)

    def content(r):
        return recs[r].text if head == "text" else recs[r].image.tobytes()

    removed = 0
    for b, row in enumerate(got.ids.tolist()):
        seen, want = set(), []
        # copies among the first k ranks: the candidates de-duplication replaces
        removed += sum(content(r) in {content(x) for x in full[b][:j]} for j, r in enumerate(full[b][: cfg.k]))
        for r in full[b]:
            if content(r) in seen:
                continue
            seen.add(content(r))
            want.append(r)
            if len(want) == cfg.k:
                break
        assert row == want, b
        assert [c.id for c in got.candidates[b]] == [recs[r].id for r in want]
    assert model.dedup["removed"] == removed > 0
    assert model.dedup["kept"] == 0
    plain = HeadModel(cfg.replace(dedup_candidates=False), model.encoder, retrieval, None)
    assert plain.candidates(images, samples).ids.tolist() == [row[: cfg.k] for row in full]


# --------------------------------------------------------------------------------------- runs
def _run(setup, retrieval, tmp_path, name, **options):
    reader, enc, _, train, val = setup
    cfg = RetrieverTrainConfig(**{**FAST, "epochs": 2, **options})
    qe = QueryEncoder(copy.deepcopy(enc), cfg.n_trainable, cfg.alpha)
    res = train_retriever(cfg, reader, "synthetic", qe, retrieval, train[:8], val[:4], tmp_path / name, progress=False)
    return res, qe


def test_result_holds_the_diagnostics_and_the_norms_the_loop_logged(setup, tmp_path, capsys):
    res, qe = _run(setup, setup[2], tmp_path, "run")
    val = setup[4][:4]
    with torch.no_grad():  # the trained head's top select_k for the validation queries, by hand
        top = setup[2].search(qe([s.image for s in val]), k_text=2, k_image=0, queries=val).ids.tolist()
    assert res.final_eval["distinct_records"] == len({r for row in top for r in row})
    assert res.final_eval["per_class_distinct"] == {
        str(c): len({r for row, s in zip(top, val) if s.label == c for r in row})
        for c in sorted({s.label for s in val})
    }
    on_disk = json.loads((tmp_path / "run" / "result.json").read_text())
    for key in ("warnings", "dedup", "excluded_self"):
        assert key in on_disk
    assert on_disk["excluded_self"]["queries"] > 0 and on_disk["excluded_self"]["records"] >= 0
    assert on_disk["dedup"]["removed"] == sum(e["dedup_removed"] for e in on_disk["epochs"])
    steps = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    norms = [s["grad_norm"] for s in steps if s["kind"] == "train"]
    per_epoch = len(norms) // 2
    for e, epoch in enumerate(res.epochs):
        d = epoch["diagnostics"]
        assert d["grad_norm"] == pytest.approx(np.mean(norms[e * per_epoch : (e + 1) * per_epoch]), rel=1e-5)
        assert d["log_k"] == pytest.approx(math.log(6))
        assert 0.0 <= d["target_entropy"] <= d["log_k"] + 1e-9 and 0.0 <= d["retriever_entropy"] <= d["log_k"] + 1e-9
        assert 0.0 <= d["reader_right_share"] <= 1.0
        ev = epoch["eval"]
        assert 1 <= ev["distinct_records"] <= 4 * 2  # 4 validation queries x select_k 2
        assert sum(ev["per_class_distinct"].values()) >= ev["distinct_records"]
    evals = [s for s in steps if s["kind"] == "eval"][1:]  # the first: before training
    assert [e["train_grad_norm"] for e in evals] == [e["diagnostics"]["grad_norm"] for e in res.epochs]
    assert [e["distinct_records"] for e in evals] == [e["eval"]["distinct_records"] for e in res.epochs]
    assert (tmp_path / "run" / "diagnostics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = stage2_diagnostics_chart({"text": on_disk}, "t")  # the chart's lines read back
    kl, ent, norm, right, distinct = fig.axes
    assert list(kl.lines[0].get_ydata()) == [e["diagnostics"]["kl"] for e in res.epochs]
    assert list(ent.lines[0].get_ydata()) == [e["diagnostics"]["target_entropy"] for e in res.epochs]
    assert list(norm.lines[0].get_ydata()) == [e["diagnostics"]["grad_norm"] for e in res.epochs]
    assert list(right.lines[0].get_ydata()) == [100 * e["diagnostics"]["reader_right_share"] for e in res.epochs]
    want = [res.initial_eval["distinct_records"]] + [e["eval"]["distinct_records"] for e in res.epochs]
    assert list(distinct.lines[0].get_ydata()) == want and list(distinct.lines[0].get_xdata()) == [0, 1, 2]
    assert not res.warnings  # the synthetic captions are scored apart: no flat target
    assert "warning" not in capsys.readouterr().err


def test_flat_target_fires_on_copies(setup, tmp_path, capsys):
    reader, enc, retrieval, train, _ = setup
    one = retrieval.records[0]
    copies = [dataclasses.replace(one, id=f"copy{i}") for i in range(16)]
    res, _ = _run(setup, _retrieval_over(copies, enc, tmp_path / "index"), tmp_path, "copies")
    kinds = {w["kind"] for w in res.warnings}
    assert "flat target" in kinds
    assert res.epochs[0]["diagnostics"]["target_entropy"] == pytest.approx(math.log(6), abs=1e-6)
    assert res.dedup["kept"] > 0  # one distinct content: the K slots filled with copies
    err = capsys.readouterr().err
    assert err.count("warning: stage 2 (text head), epoch 1: flat target") == 1


def test_collapse_fires_when_the_distinct_records_fall_below_the_ratio(setup, tmp_path, monkeypatch, capsys):
    from jomed_fast.train import retriever_model

    seen = []

    def forced(ids):  # the evaluation before training reports 40 distinct records, the later ones 1
        seen.append(len(seen))
        return 40 if len(seen) == 1 else 1

    monkeypatch.setattr(retriever_model, "distinct_records", forced)
    res, _ = _run(setup, setup[2], tmp_path, "collapse", collapse_ratio=0.25)
    assert [w["epoch"] for w in res.warnings if w["kind"] == "retrieval collapse"] == [1, 2]
    assert capsys.readouterr().err.count("retrieval collapse: 1 distinct index records") == 2
    seen.clear()
    res, _ = _run(setup, setup[2], tmp_path, "no-collapse", collapse_ratio=0.02)  # 1 >= 0.02 x 40
    assert not [w for w in res.warnings if w["kind"] == "retrieval collapse"]
