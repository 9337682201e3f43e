"""Inference: retrieved candidates, per-candidate scores, fusion and decisions against independent
computations (float64 fusion by hand, one-candidate scorer calls, brute-force retrieval), the
robustness modes, and resume after a torn write."""

import json

import numpy as np
import pytest
import torch

from jomed_fast.candidate_retrieval import Retrieval
from jomed_fast.data.synthetic import SyntheticGenerator
from jomed_fast.identity import IdentityMismatch
from jomed_fast.index import Index
from jomed_fast.infer import (
    InferConfig,
    decide,
    fuse,
    head_normalized_scores,
    predict,
    read_predictions,
)
from jomed_fast.readers import load_reader, tiny
from jomed_fast.retriever import TinyCLIP
from jomed_fast.scoring import CandidateScorer

pytestmark = pytest.mark.usefixtures("one_thread")
N_INDEX, N_QUERIES = 120, 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    reader = load_reader(tiny.build("qwen2_vl", root / "reader"), device="cpu")
    reader.model.requires_grad_(False)
    gen = SyntheticGenerator(index_size=N_INDEX, image_size=32)
    records = gen.index_records(0, N_INDEX)
    torch.manual_seed(0)
    encoder = TinyCLIP.from_captions([r.text for r in records], width=8, depth=1, dim=32)
    index = Index.build(records, encoder, root / "index", batch_size=60, chunk_size=60, progress=False)
    samples = [gen.sample("test", i) for i in range(N_QUERIES)]
    scorer = CandidateScorer(reader, "synthetic", "paper")
    return scorer, Retrieval(index, records), encoder, samples


def test_predictions_match_independent_computations(setup, tmp_path):
    scorer, retrieval, encoder, samples = setup
    config = InferConfig(k_text=2, k_image=1, batch_size=2)
    recs = predict(
        scorer,
        samples,
        retrieval=retrieval,
        encoder=encoder,
        config=config,
        out_path=tmp_path / "p.jsonl",
        progress=False,
    )
    assert [r.query_id for r in recs] == [str(s.id) for s in samples]
    assert read_predictions(tmp_path / "p.jsonl") == recs
    with torch.no_grad():
        q = encoder.encode_images([s.load_image() for s in samples]).double()
    q = q.to(torch.float16).double()
    for b, (rec, sample) in enumerate(zip(recs, samples)):
        assert rec.gold == sample.label and rec.kind == "multiclass"
        assert [c.head for c in rec.candidates] == ["text", "text", "image"]
        # retrieval: the candidates reach the brute-force top scores of their head
        for _k, c in enumerate(rec.candidates):
            emb = torch.from_numpy(np.asarray(retrieval.index.embeddings[c.head], dtype=np.float64))
            row = [r.id for r in retrieval.records].index(c.id)
            assert float(q[b] @ emb[row]) == pytest.approx(c.score, abs=1e-3)
            rank_k = 2 if c.head == "text" else 1
            assert float(q[b] @ emb[row]) >= float((q[b] @ emb.T).topk(rank_k).values[-1]) - 1e-6
        # per-candidate scores: one scorer call per candidate, alone
        for c in rec.candidates:
            alone = (
                scorer.score(
                    [sample.load_image()], None, [[retrieval.candidate([r.id for r in retrieval.records].index(c.id))]]
                )[0, 0]
                .double()
                .exp()
            )
            torch.testing.assert_close(torch.tensor(c.probs, dtype=torch.float64), alone, atol=1e-5, rtol=0)
            assert c.prediction == int(alone.argmax())
        # fusion: sum_k p_k softmax(s)_k in float64
        p = torch.tensor([c.probs for c in rec.candidates], dtype=torch.float64)
        w = torch.softmax(torch.tensor([c.score for c in rec.candidates], dtype=torch.float64), 0)
        want = (w[:, None] * p).sum(0)
        torch.testing.assert_close(torch.tensor(rec.fused_probs, dtype=torch.float64), want, atol=1e-5, rtol=0)
        assert rec.fused == int(want.argmax())


def test_resume_after_a_torn_write_scores_only_the_rest(setup, tmp_path, monkeypatch):
    scorer, retrieval, encoder, samples = setup
    config = InferConfig(batch_size=2)
    path = tmp_path / "p.jsonl"
    full = predict(scorer, samples, retrieval=retrieval, encoder=encoder, config=config, out_path=path, progress=False)
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join(lines[:2]) + b"\n" + lines[2][:25])  # 2 complete records + a torn third
    calls = []
    real = scorer.score
    monkeypatch.setattr(scorer, "score", lambda imgs, qs, cands: calls.append(len(imgs)) or real(imgs, qs, cands))
    again = predict(scorer, samples, retrieval=retrieval, encoder=encoder, config=config, out_path=path, progress=False)
    assert sum(calls) == N_QUERIES - 2
    assert again == full and read_predictions(path) == full
    assert len(path.read_text().splitlines()) == N_QUERIES
    # the batch size cannot change a result: a rerun with another one resumes (nothing to do)
    calls.clear()
    assert (
        predict(
            scorer,
            samples,
            retrieval=retrieval,
            encoder=encoder,
            config=InferConfig(batch_size=3),
            out_path=path,
            progress=False,
        )
        == full
    )
    assert calls == []
    with pytest.raises(IdentityMismatch, match=r"predictions .*p\.jsonl: .*\(option\.k_text changed\)"):
        predict(
            scorer,
            samples,
            retrieval=retrieval,
            encoder=encoder,
            config=InferConfig(k_text=1),
            out_path=path,
            progress=False,
        )
    assert read_predictions(path) == full


def test_robustness_modes(setup):
    scorer, retrieval, encoder, samples = setup
    none = predict(scorer, samples[:2], config=InferConfig(retrieval="none"), progress=False)
    alone = scorer.score([s.load_image() for s in samples[:2]], None, [[None], [None]]).exp()
    for rec, row in zip(none, alone):
        assert len(rec.candidates) == 1 and rec.candidates[0].head == "none"
        torch.testing.assert_close(torch.tensor(rec.fused_probs), row[0].float(), atol=1e-5, rtol=0)
    rand = predict(
        scorer, samples[:2], retrieval=retrieval, config=InferConfig(retrieval="random", seed=3), progress=False
    )
    again = predict(
        scorer, samples[:2], retrieval=retrieval, config=InferConfig(retrieval="random", seed=3), progress=False
    )
    assert rand == again and all(c.score == 0.0 for r in rand for c in r.candidates)
    for rec in rand:  # uniform weights
        p = torch.tensor([c.probs for c in rec.candidates], dtype=torch.float64).mean(0)
        torch.testing.assert_close(torch.tensor(rec.fused_probs, dtype=torch.float64), p, atol=1e-5, rtol=0)
    blind = predict(
        scorer, samples[:1], retrieval=retrieval, encoder=encoder, config=InferConfig(query_image=False), progress=False
    )
    seeing = predict(scorer, samples[:1], retrieval=retrieval, encoder=encoder, progress=False)
    assert [c.id for c in blind[0].candidates] == [c.id for c in seeing[0].candidates]
    assert blind[0].candidates[0].probs != seeing[0].candidates[0].probs


def test_reference_fusion_by_hand():
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(3, 4, 5, generator=g, dtype=torch.float64), -1)
    s = torch.rand(3, 4, generator=g, dtype=torch.float64) + 0.1
    heads = [["text", "text", "image", "image"]] * 3
    got = fuse(lp.float(), s.float(), heads, "reference").double()
    for b in range(3):
        norm = torch.cat([s[b, :2] / s[b, :2].max(), s[b, 2:] / s[b, 2:].max()])
        w = torch.exp(norm) / torch.exp(norm).sum()
        logits = (w[:, None] * lp[b]).sum(0)
        torch.testing.assert_close(got[b], torch.exp(logits) / torch.exp(logits).sum(), atol=1e-6, rtol=0)
    paper = fuse(lp.float(), s.float(), heads, "paper").double()
    torch.testing.assert_close(paper, (torch.softmax(s, 1)[..., None] * lp.exp()).sum(1), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="scores: the reference fusion"):
        head_normalized_scores(-s, heads)
    with pytest.raises(ValueError, match="method:"):
        fuse(lp, s, heads, "mean")
    with pytest.raises(ValueError, match="heads: the reference fusion needs"):
        fuse(lp, s, None, "reference")


def test_decisions_and_config_errors():
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.4, 0.35, 0.25]])
    assert decide(probs) == [1, 0]
    assert decide(probs, multilabel=True, threshold=0.3) == [[1, 2], [0, 1]]
    assert decide(probs, multilabel=True, threshold=0.5) == [[1], [0]]  # none passes: the top label
    with pytest.raises(ValueError, match="threshold"):
        decide(probs, True, 0.0)
    for bad, match in [
        ({"k_text": 0, "k_image": 0}, "k_text, k_image"),
        ({"fusion": "max"}, "fusion:"),
        ({"retrieval": "oracle"}, "retrieval:"),
        ({"batch_size": 0}, "batch_size:"),
        ({"tau": 0.0}, "tau:"),
        ({"tau": float("inf")}, "tau:"),
        ({"tau": float("nan")}, "tau:"),
        ({"threshold": 1.5}, "threshold:"),
        ({"layout": "grid"}, "layout:"),
    ]:
        with pytest.raises(ValueError, match=match):
            InferConfig(**bad)
    assert json.loads(json.dumps(InferConfig().__dict__))["k_text"] == 2


def test_open_vqa_answers_match_unbatched_hf_generate(setup):
    from jomed_fast.infer import OpenAnswerer, fuse_open_answers, generate_answers
    from jomed_fast.prompts import as_image, build_messages
    from jomed_fast.tasks import get_task

    scorer, retrieval, _encoder, samples = setup
    reader, task = scorer.reader, get_task("vqa_rad_open")
    cands = [retrieval.candidate(n) for n in (3, 40, 77)]
    qimg, question = samples[0].load_image(), "what abnormality is seen?"
    answers, mean_lp = generate_answers(reader, task, "paper", qimg, question, cands, max_new_tokens=6)
    proc = reader.processor
    config = reader.hf_model.config  # answers never hold an image (or video) placeholder
    placeholders = [t for t in (config.image_token_id, getattr(config, "video_token_id", None)) if t is not None]
    for k, cand in enumerate(cands):  # one prompt at a time, no padding: the independent reference
        messages, images = build_messages("paper", task, as_image(qimg), question, cand)
        inputs = reader.encode([as_image(i) for i in images], messages)
        out = reader.hf_model.generate(
            **inputs,
            max_new_tokens=6,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            eos_token_id=proc.end_of_turn_token_id,
            pad_token_id=proc.pad_token_id,
            suppress_tokens=placeholders,
        )
        new = out.sequences[0, inputs["input_ids"].shape[1] :]
        lps = [torch.log_softmax(s[0].double(), -1)[t] for s, t in zip(out.scores, new)]
        ends = (new == proc.end_of_turn_token_id).nonzero()
        n = int(ends[0]) + 1 if len(ends) else len(new)
        assert answers[k] == proc.decode(new[:n].tolist(), skip_special_tokens=True).strip()
        assert float(mean_lp[k]) == pytest.approx(float(torch.stack(lps[:n]).mean()), abs=1e-4)
    fused, votes = fuse_open_answers(
        ["The cyst.", "cyst", "a mass"], torch.log(torch.tensor([0.5, 0.2, 0.9])), torch.tensor([0.4, 0.4, 0.2])
    )
    assert fused == "The cyst." and votes == pytest.approx({"cyst": 0.4 * 0.5 + 0.4 * 0.2, "mass": 0.2 * 0.9})
    from jomed_fast.data import Sample

    open_samples = [Sample(id="o1", image_path=None, answer="cyst", question=question, image=qimg)]
    recs = predict(
        OpenAnswerer(reader, task),
        open_samples,
        retrieval=retrieval,
        encoder=_encoder,
        config=InferConfig(max_new_tokens=6),
        progress=False,
    )
    assert recs[0].kind == "vqa_open" and isinstance(recs[0].fused, str) and recs[0].gold == "cyst"
    assert all(isinstance(c.prediction, str) and 0 < c.probs[0] <= 1 for c in recs[0].candidates)
    with pytest.raises(ValueError, match="has a class set"):
        OpenAnswerer(reader, "synthetic")
