"""Multi-label tasks: the reader's answer is a set of labels.

Exactness: the label-set head's answer-set log-probabilities and per-label marginals against a
brute-force enumeration — every answer of the language as its own token sequence, appended to
the full prompt and run alone through the *unmodified* Hugging Face model, each step's softmax
taken (in float64) over the tokens that continue some answer of the language, found by scanning
all the answers' sequences. Then the pipeline: a synthetic task whose correct sets (of two and
three labels) are known, fused and thresholded, its metrics and oracle; stage 2's gold target.
"""

import copy
import itertools
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from jomed_fast import prompts
from jomed_fast.readers import load_reader, tiny
from jomed_fast.scoring import Candidate, CandidateScorer
from jomed_fast.scoring.label_set_head import LabelSetHead
from jomed_fast.tasks import Task

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5
# "1" is a prefix of "10": the trie shares it, and the end token tells them apart
TASK = Task(
    name="findings",
    kind="multilabel",
    labels=("0", "1", "2", "10"),
    label_names=("normal", "cyst", "mass", "calcification"),
    question="Select all findings you see from the given labels",
    instructions="Provide answer according to the labels:\n0 - 'normal'\n1 - 'cyst'\n2 - 'mass'\n10 - 'calcification'\n\n",
)


def _image(h, w, seed):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("multilabel")
    out = {}
    for arch in tiny.ARCHS:
        path = tiny.build(arch, root / arch)
        reader = load_reader(path, device="cpu")
        reader.model.requires_grad_(False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = tiny.model_class(arch).from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
        out[arch] = (reader, hf)
    return out


@torch.no_grad()
def brute_force_set_log_probs(hf, processor, task, layout, qimg, cand, verbalizer, sets):
    """``log p(S)`` per answer ``S`` (float64): each answer's tokens after the full prompt, one HF
    forward per answer, each step normalised over the continuations the language allows there."""
    messages, images = prompts.build_messages(layout, task, qimg, None, cand)
    enc = processor.encode(images, messages)
    P = enc["input_ids"].shape[1]
    seqs = [verbalizer.target_ids(list(s)) for s in sets]
    out = []
    for seq in seqs:
        e = dict(enc)
        e["input_ids"] = torch.cat([enc["input_ids"], torch.tensor([seq])], 1)
        e["attention_mask"] = torch.ones_like(e["input_ids"])
        if "mm_token_type_ids" in enc:
            zeros = torch.zeros(1, len(seq), dtype=enc["mm_token_type_ids"].dtype)
            e["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], zeros], 1)
        logits = hf(**e, use_cache=False).logits[0, P - 1 : P - 1 + len(seq)].double()
        total = 0.0
        for t, tok in enumerate(seq):
            nxt = sorted({o[t] for o in seqs if len(o) > t and o[:t] == seq[:t]})
            total += float(logits[t, tok] - logits[t, nxt].logsumexp(0))
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("max_labels", [None, 2], ids=["all_sets", "at_most_2"])
@pytest.mark.parametrize("layout", prompts.LAYOUTS)
@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_label_marginals_equal_brute_force_enumeration(models, arch, layout, max_labels):
    reader, hf = models[arch]
    scorer = CandidateScorer(reader, TASK, layout, max_labels=max_labels)
    head = scorer.head
    assert isinstance(head, LabelSetHead) and head.mode == "label_sets"
    sets = list(itertools.chain.from_iterable(itertools.combinations(range(4), m) for m in range(1, 5)))
    if max_labels is not None:
        sets = [s for s in sets if len(s) <= max_labels]
    assert [tuple(s) for s in head.sets] == sets
    qimgs = [_image(42, 42, 1), _image(48, 36, 2)]
    cands = [
        [Candidate(_image(28, 28, 10), "a small round cyst"), Candidate(None, "irregular mass")],
        [Candidate(_image(42, 28, 11), "punctate echogenic foci"), Candidate(_image(28, 42, 12), "")],
    ]
    set_lp = scorer.score(qimgs, None, cands, label_sets=True)
    marg = scorer.score(qimgs, None, cands)
    assert set_lp.shape == (2, 2, len(sets)) and marg.shape == (2, 2, 4)
    for b in range(2):
        for k in range(2):
            want = brute_force_set_log_probs(
                hf, reader.processor, TASK, layout, qimgs[b], cands[b][k], scorer.verbalizer, sets
            )
            torch.testing.assert_close(set_lp[b, k].double(), want, atol=ATOL, rtol=0)
            p = want.exp()
            # a distribution over the answers (each HF forward rounds its own fp32 logits)
            assert float(p.sum()) == pytest.approx(1.0, abs=1e-6)
            want_marg = torch.stack([p[[i for i, s in enumerate(sets) if c in s]].sum() for c in range(4)])
            torch.testing.assert_close(marg[b, k].double().exp(), want_marg, atol=ATOL, rtol=0)
            # marginals are not a softmax over the labels: they sum to the expected number of labels
            expected_size = float((p * torch.tensor([len(s) for s in sets], dtype=torch.float64)).sum())
            assert float(marg[b, k].double().exp().sum()) == pytest.approx(expected_size, abs=1e-4)
            assert expected_size > 1.0


# ---------------------------------------------------------------------------------- the pipeline
SIX = Task(name="six_findings", kind="multilabel", labels=tuple(str(i) for i in range(6)), question="Which findings?")
GOLD = [frozenset(s) for s in ({0}, {1, 3}, {2, 4, 5}, {0, 5}, {1, 2, 3}, {4})]


def _set_distributions(head, gold, signal: bool, rng) -> torch.Tensor:
    """``log p(S)`` ``[K=4, |S|]`` of one query: two candidates that read the gold set (0.7 on it,
    the rest spread evenly) when ``signal``, the others a random distribution over the sets."""
    rows = []
    for k in range(4):
        if signal and k < 2:
            p = np.full(head.num_sets, 0.3 / (head.num_sets - 1))
            p[head.set_index(gold)] = 0.7
        else:
            p = rng.dirichlet(np.ones(head.num_sets))
        rows.append(np.log(p))
    return torch.tensor(np.array(rows), dtype=torch.float32)


def _records(head, signal, seed=0, fusion_input=None):
    from jomed_fast.analysis import Candidate as CandidateRecord
    from jomed_fast.analysis import PredictionRecord
    from jomed_fast.infer import decide, fuse

    rng = np.random.default_rng(seed)
    set_lp = torch.stack([_set_distributions(head, g, signal, rng) for g in GOLD])  # [B, K, |S|]
    marg = head.marginals(set_lp)  # [B, K, C]
    scores = torch.tensor([[1.0, 1.0, 0.0, 0.0]] * len(GOLD))
    log_probs = marg if fusion_input is None else fusion_input(marg)
    fused = fuse(log_probs, scores, [["text", "text", "image", "image"]] * len(GOLD), multilabel=True)
    fused_pred = decide(fused, multilabel=True, threshold=0.5)
    recs = []
    for b, g in enumerate(GOLD):
        per_cand = decide(log_probs[b].exp(), multilabel=True, threshold=0.5)
        cands = [CandidateRecord(f"r{k}", "text", float(scores[b, k]), [], per_cand[k]) for k in range(4)]
        recs.append(PredictionRecord(f"q{b}", sorted(g), "multilabel", cands, fused_pred[b], fused[b].tolist()))
    return recs


def test_synthetic_sets_are_predicted_when_the_signal_is_there(models):
    from sklearn.metrics import f1_score

    from jomed_fast.analysis import oracle_accuracy, oracle_f1
    from jomed_fast.eval import prediction_metrics
    from jomed_fast.tasks.verbalizer import build_verbalizer

    reader, _ = models["qwen2_vl"]
    head = LabelSetHead(build_verbalizer(SIX, reader.tokenizer), max_labels=3)
    assert head.num_sets == 6 + 15 + 20
    recs = _records(head, signal=True)
    assert [frozenset(r.fused) for r in recs] == GOLD  # sets of one, two and three labels, all right
    m = prediction_metrics(recs, 6)
    ind = lambda sets: np.array([[c in s for c in range(6)] for s in sets])  # noqa: E731
    want_f1 = f1_score(ind(GOLD), ind([frozenset(r.fused) for r in recs]), average="macro", zero_division=0)
    assert m["subset_accuracy"] == 1.0 and m["macro_f1"] == pytest.approx(want_f1) == 1.0
    assert oracle_accuracy(recs) == 1.0 and oracle_f1(recs, 6) == 1.0

    noise = _records(head, signal=False)
    assert prediction_metrics(noise, 6)["subset_accuracy"] < 0.5  # no signal, no sets

    # one softmax over the labels (the single-label reading) makes them compete: one label at most
    softmax = _records(head, signal=True, fusion_input=lambda marg: torch.log_softmax(marg, -1))
    assert all(len(r.fused) == 1 for r in softmax)
    assert prediction_metrics(softmax, 6)["subset_accuracy"] == pytest.approx(2 / 6)  # the one-label golds only


def test_oracle_on_sets_against_brute_force():
    from sklearn.metrics import f1_score

    from jomed_fast.analysis import Candidate as CandidateRecord
    from jomed_fast.analysis import PredictionRecord, oracle_accuracy, oracle_correct, oracle_f1, oracle_pick

    rng = np.random.default_rng(3)
    recs = []
    for q in range(30):
        gold = sorted(int(c) for c in rng.choice(5, size=int(rng.integers(1, 4)), replace=False))
        cands = []
        for k in range(3):
            pred = sorted(int(c) for c in rng.choice(5, size=int(rng.integers(1, 4)), replace=False))
            cands.append(CandidateRecord(f"r{k}", "text", 0.0, [0.2] * 5, pred))
        recs.append(PredictionRecord(f"q{q}", gold, "multilabel", cands, cands[0].prediction, [0.2] * 5))
    # brute force: every candidate's per-query F1, the best one (first on ties)
    best = []
    for r in recs:
        f1s = [2 * len(set(c.prediction) & set(r.gold)) / (len(c.prediction) + len(r.gold)) for c in r.candidates]
        best.append(r.candidates[int(np.argmax(f1s))].prediction)
        assert oracle_pick(r) == int(np.argmax(f1s))
        assert oracle_correct(r) == (max(f1s) == 1.0)
    assert oracle_accuracy(recs) == pytest.approx(
        np.mean([max(1 if set(c.prediction) == set(r.gold) else 0 for c in r.candidates) for r in recs])
    )
    ind = lambda sets: np.array([[c in s for c in range(5)] for s in sets])  # noqa: E731
    want = f1_score(ind([r.gold for r in recs]), ind(best), average="macro", zero_division=0)
    assert oracle_f1(recs) == pytest.approx(want)
    assert 0 < oracle_accuracy(recs) < 1 and oracle_f1(recs) > 0

    # single label: the first right candidate, else candidate 0
    single = [
        PredictionRecord("a", 2, "multiclass", [CandidateRecord("x", "text", 0.0, [0.3] * 3, p) for p in (0, 2, 2)], 0),
        PredictionRecord("b", 1, "multiclass", [CandidateRecord("x", "text", 0.0, [0.3] * 3, p) for p in (0, 2, 0)], 0),
    ]
    assert [oracle_pick(r) for r in single] == [1, 0]
    assert oracle_f1(single) == pytest.approx(
        f1_score([2, 1], [2, 0], labels=[0, 1, 2], average="macro", zero_division=0)
    )
    with pytest.raises(ValueError, match="open VQA"):
        oracle_pick(PredictionRecord("o", "x", "vqa_open", [CandidateRecord("x", "text", 0.0, [], "x")], "x"))


def test_reference_fusion_weights_the_marginals():
    from jomed_fast.infer import fuse

    g = torch.Generator().manual_seed(0)
    marg = torch.rand(3, 4, 5, generator=g, dtype=torch.float64) * 0.98 + 0.01
    s = torch.rand(3, 4, generator=g, dtype=torch.float64) + 0.1
    heads = [["text", "text", "image", "image"]] * 3
    got = fuse(marg.log().float(), s.float(), heads, "reference", multilabel=True).double()
    for b in range(3):
        norm = torch.cat([s[b, :2] / s[b, :2].max(), s[b, 2:] / s[b, 2:].max()])
        w = torch.exp(norm) / torch.exp(norm).sum()
        torch.testing.assert_close(got[b], (w[:, None] * marg[b]).sum(0), atol=1e-6, rtol=0)
    paper = fuse(marg.log().float(), s.float(), heads, "paper", multilabel=True).double()
    torch.testing.assert_close(paper, (torch.softmax(s, 1)[..., None] * marg).sum(1), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------- stage 2
SETS5 = Task(
    name="synthetic_sets", kind="multilabel", labels=tuple(str(i) for i in range(5)), question="Which lesions?"
)


def _as_sets(samples):
    """The synthetic samples with gold sets: {y, y + 2 mod 5} for every other sample, {y} otherwise."""
    import dataclasses

    out = []
    for i, s in enumerate(samples):
        gold = frozenset({s.label, (s.label + 2) % 5}) if i % 2 == 0 else frozenset({s.label})
        out.append(dataclasses.replace(s, label=gold, answer=SETS5.format_answer(gold)))
    return out


def test_stage2_distils_the_gold_set_likelihood(tmp_path_factory, tmp_path, monkeypatch):
    import _stage2_worker as W

    from jomed_fast.retriever import QueryEncoder
    from jomed_fast.train import retriever_model
    from jomed_fast.train.retriever import RetrieverTrainConfig, train_retriever

    reader, enc, retrieval, train, _ = W.load(W.build(tmp_path_factory.mktemp("stage2_sets")))
    train = _as_sets(train)
    assert any(len(s.label) == 2 for s in train)
    cfg = RetrieverTrainConfig(
        k=6, batch_size=4, refresh_every=None, alpha=None, lr=1e-2, weight_decay=0.0, warmup_steps=0,
        tau_reader=0.1, tau_retriever=0.1, checkpoint_every=100, epochs=6,
    )  # fmt: skip
    targets = []
    real_batch = retriever_model.HeadModel.batch

    def spy(self, queries, idx, gold="paper"):
        r, e, images = real_batch(self, queries, idx, gold)
        with torch.no_grad():  # the same search as the batch's (copies of a caption left out)
            got = self.candidates(images, [queries.samples[i] for i in idx])
        targets.append((list(idx), r.clone(), got))
        return r, e, images

    monkeypatch.setattr(retriever_model.HeadModel, "batch", spy)
    res = train_retriever(
        cfg, reader, SETS5, QueryEncoder(copy.deepcopy(enc), cfg.n_trainable, cfg.alpha), retrieval, train,
        None, tmp_path / "run", progress=False,
    )  # fmt: skip
    assert res.final_eval["kl"] < 0.8 * res.initial_eval["kl"]
    assert 0.0 <= res.final_eval["accuracy"] <= 1.0

    # the target: each candidate's log-likelihood of the query's gold set, from a direct scorer call
    scorer = CandidateScorer(reader, SETS5, cfg.layout)
    sets = [s for m in (1, 2, 3) for s in itertools.combinations(range(5), m)]
    idx, r, got = targets[0]
    with torch.no_grad():
        direct = scorer.score([train[i].image for i in idx], None, got.candidates, label_sets=True)
    want = torch.stack([direct[b, :, sets.index(tuple(sorted(train[i].label)))] for b, i in enumerate(idx)])
    torch.testing.assert_close(r, want, atol=1e-5, rtol=0)
    assert (r < 0).all() and (r.exp() < 1).all()


def test_predict_runs_a_multilabel_task_end_to_end(tmp_path_factory, tmp_path):
    import _stage2_worker as W

    from jomed_fast.analysis import oracle_accuracy, oracle_f1
    from jomed_fast.eval import prediction_metrics
    from jomed_fast.infer import InferConfig, predict

    reader, enc, retrieval, train, _ = W.load(W.build(tmp_path_factory.mktemp("predict_sets")))
    samples = _as_sets(train[:4])
    scorer = CandidateScorer(reader, SETS5, "paper")
    config = InferConfig(k_text=2, k_image=1, batch_size=2, threshold=0.3)
    recs = predict(scorer, samples, retrieval=retrieval, encoder=enc, config=config, out_path=tmp_path / "p.jsonl", progress=False)  # fmt: skip
    for rec, sample in zip(recs, samples):
        assert rec.gold == sorted(sample.label) and rec.kind == "multilabel"
        probs = np.array([c.probs for c in rec.candidates], dtype=np.float64)  # [K, C] label marginals
        assert (probs.sum(1) > 1).all()  # not one softmax over the labels
        w = np.exp([c.score for c in rec.candidates])
        fused = (w[:, None] / w.sum() * probs).sum(0)
        np.testing.assert_allclose(rec.fused_probs, fused, atol=1e-5)
        chosen = [c for c in range(5) if fused[c] >= 0.3] or [int(fused.argmax())]
        assert rec.fused == chosen
    m = prediction_metrics(recs)
    assert set(m) == {"n", "subset_accuracy", "macro_f1"} and m["n"] == 4
    assert 0 <= oracle_accuracy(recs) <= 1 and 0 <= oracle_f1(recs) <= 1
