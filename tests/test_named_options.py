"""Named options that reproduce what they name: one prompt layout across the stages, the authors'
code's stage-2 target and candidate query, both random-retrieval modes, the paper's open-VQA
marginal and LoRA on the vision tower; each against an independent computation (float64 torch,
brute-force search, unbatched Hugging Face forwards)."""

import copy
import json
import math
import warnings

import _stage2_worker as W
import pytest
import torch
import torch.nn.functional as F

from jomed_fast.infer import InferConfig, paper_open_answer, predict, random_queries, result_options
from jomed_fast.infer.open_vqa import generate_answer_tokens
from jomed_fast.prompts import as_image, build_messages
from jomed_fast.readers import load_reader, save_adapter, tiny
from jomed_fast.readers.fingerprint import reader_fingerprint
from jomed_fast.retriever import QueryEncoder
from jomed_fast.scoring import CandidateScorer
from jomed_fast.tasks import get_task
from jomed_fast.train import ReaderTrainConfig, RetrieverTrainConfig, train_reader
from jomed_fast.train.retriever import train_retriever
from jomed_fast.train.retriever_loss import distillation_loss, distillation_target, gold_scores
from jomed_fast.train.retriever_model import HeadModel

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar:UserWarning"),
]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return W.build(tmp_path_factory.mktemp("named"))


@pytest.fixture(scope="module")
def setup(root):
    return W.load(root)


def _reader(root, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_reader(root / "reader", device="cpu", **kwargs)


# ------------------------------------------------------------------------------ stage-2 targets
def _entropy64(logits: torch.Tensor) -> float:
    p = torch.softmax(logits.double(), -1)
    return float(-(p * p.log()).sum())


def test_the_codes_double_softmax_gold_is_nearly_uniform_on_the_documented_toy():
    """The toy of ``retriever_loss``'s docstring: 50 candidates x 7 classes, class logits 3 N(0, 1)
    (seed 2), gold class 0; the target's entropy at tau 1, through the library (float32) and
    independently in float64 (the authors' ``-cross_entropy(softmax(logits), gold)``)."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 50, 7, generator=g, dtype=torch.float64) * 3
    labels = torch.zeros(1, dtype=torch.long)
    rows = torch.log_softmax(logits, -1).float()
    s = torch.zeros(1, 50)
    paper = _entropy64(distillation_target(s, gold_scores(rows, labels, "paper"), "gold")[0])
    code_gold = gold_scores(rows, labels, "reference_double_softmax")
    code = _entropy64(distillation_target(s, code_gold, "reference_double_softmax_gold")[0])
    flat = torch.softmax(logits[0], -1)
    ref_code = -F.cross_entropy(flat, torch.zeros(50, dtype=torch.long), reduction="none")
    ref_paper = torch.log_softmax(logits[0], -1)[:, 0]
    assert paper == pytest.approx(_entropy64(ref_paper), abs=5e-3)
    assert code == pytest.approx(_entropy64(ref_code), abs=5e-3)
    assert paper < code < math.log(50)
    # the figures the docstring and docs/training.md quote
    assert (round(paper, 2), round(code, 2), round(math.log(50), 2)) == (2.51, 3.86, 3.91)


@pytest.mark.parametrize("target", ["reference_double_softmax_gold", "reference_double_softmax_gold_with_prior"])
def test_the_codes_targets_match_its_float64_computation(target):
    g = torch.Generator().manual_seed(1)
    B, K, C = 3, 6, 4
    logits = torch.randn(B, K, C, generator=g) * 2
    labels = torch.tensor([0, 3, 1])
    s = torch.randn(B, K, generator=g, requires_grad=True)
    cfg = RetrieverTrainConfig(target=target, tau_retriever=0.5, tau_reader=0.8)
    r = gold_scores(torch.log_softmax(logits, -1), labels, "reference_double_softmax")
    got = distillation_loss(s, r, cfg)
    # src/jomed.py: gold = -cross_entropy(softmax(class logits), gold); the prior adds
    # log_softmax(gold) + log_softmax(retriever score, detached)
    probs = torch.softmax(logits.double(), -1).reshape(B * K, C)
    gold = -F.cross_entropy(probs, labels.repeat_interleave(K), reduction="none").view(B, K)
    t = gold
    if target.endswith("_with_prior"):
        t = torch.log_softmax(gold, -1) + torch.log_softmax(s.detach().double(), -1)
    p = torch.softmax(t / 0.8, -1)
    want = (p * (p.log() - torch.log_softmax(s.detach().double() / 0.5, -1))).sum(-1).mean()
    assert float(got) == pytest.approx(float(want), rel=1e-5, abs=1e-7)


# ------------------------------------------------------------------------------ stage-2 candidates
def _perturbed_head(cfg, enc, retrieval):
    """A HeadModel whose stale copy differs from the frozen encoder, as after training steps."""
    qe = QueryEncoder(copy.deepcopy(enc), cfg.n_trainable, cfg.alpha)
    head = HeadModel(cfg, qe, retrieval, pairs=None)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in head.candidate_encoder.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return head, qe


@pytest.mark.parametrize("head_name", ["text", "image"])
def test_stage2_candidates_are_the_brute_force_top_k_of_the_mixed_query(setup, head_name):
    _reader, enc, retrieval, train, _val = setup
    # the ranking itself: copies of a caption kept (de-duplication: tests/test_stage2_diagnostics.py)
    cfg = RetrieverTrainConfig(k=8, alpha=0.15, head=head_name, dedup_candidates=False)
    assert cfg.candidate_query == "mixed"
    head, qe = _perturbed_head(cfg, enc, retrieval)
    images = [s.load_image() for s in train[:6]]
    got = head.candidates(images).ids.cpu()
    with torch.no_grad():
        stale = head.candidate_encoder.encode_images(images).double()
        frozen = qe.frozen.encode_images(images).double()
    rows = retrieval.index.head(head_name).double()  # [N, D]
    mixed = (0.15 * stale + 0.85 * frozen) @ rows.T
    want = mixed.topk(8, -1).indices
    assert [sorted(r) for r in got.tolist()] == [sorted(r) for r in want.tolist()]
    # the stale copy alone retrieves other rows here: the option is a different query
    unmixed = (stale @ rows.T).topk(8, -1).indices
    assert [sorted(r) for r in unmixed.tolist()] != [sorted(r) for r in want.tolist()]
    head.config = cfg.replace(candidate_query="unmixed")
    assert [sorted(r) for r in head.candidates(images).ids.tolist()] == [sorted(r) for r in unmixed.tolist()]


# ------------------------------------------------------------------------------ one layout
def test_every_stage_defaults_to_the_paper_layout(capsys):
    from jomed_fast.cli import main

    assert RetrieverTrainConfig().layout == ReaderTrainConfig().layout == InferConfig().layout == "paper"
    for command in ("train-reader", "train-retriever", "predict"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "prompt layout (default: paper)" in " ".join(capsys.readouterr().out.split())


def test_a_stage1_adapter_records_its_layout_and_the_later_stages_hold_to_it(root, setup, tmp_path):
    _r, enc, retrieval, train, val = setup
    reader = _reader(root, lora=True)
    result = train_reader(
        ReaderTrainConfig(max_steps=1, batch_size=2, eval_every=1, save_every=1, gradient_checkpointing=False),
        reader,
        get_task("synthetic"),
        train[:2],
        val[:1],
        tmp_path / "s1",
        progress=False,
    )
    meta = json.loads((result.adapter_dir / "jomed_adapter.json").read_text())
    assert meta["layout"] == "paper" and reader.trained_layout == "paper"
    assert json.loads((tmp_path / "s1" / "config.json").read_text())["lora"]["vision"] is False
    loaded = _reader(root, lora=result.adapter_dir)
    assert loaded.trained_layout == "paper"

    fast = dict(k=4, batch_size=2, max_steps=1, eval_each_epoch=False, alpha=0.15, refresh_every=None)
    with pytest.raises(ValueError) as err:
        train_retriever(
            RetrieverTrainConfig(**fast, layout="shared_query"),
            loaded,
            "synthetic",
            QueryEncoder(copy.deepcopy(enc), 10, 0.15),
            retrieval,
            train[:2],
            run_dir=tmp_path / "s2",
            progress=False,
        )
    msg = str(err.value)
    assert "'paper'" in msg and "'shared_query'" in msg and "RetrieverTrainConfig.layout" in msg
    assert str(result.adapter_dir / "jomed_adapter.json") in msg and "allow_layout_mismatch" in msg
    cfg = RetrieverTrainConfig(**fast, layout="shared_query", allow_layout_mismatch=True)
    qe = QueryEncoder(copy.deepcopy(enc), 10, 0.15)
    train_retriever(cfg, loaded, "synthetic", qe, retrieval, train[:2], run_dir=tmp_path / "s2", progress=False)
    recorded = json.loads((tmp_path / "s2" / "config.json").read_text())
    assert recorded["allow_layout_mismatch"] is True and recorded["candidate_query"] == "mixed"
    assert recorded["target"] == "gold" and recorded["layout"] == "shared_query"

    scorer = CandidateScorer(loaded, "synthetic", "shared_query")
    none = dict(retrieval="none", layout="shared_query")
    with pytest.raises(ValueError, match=r"'paper' layout .*InferConfig\.layout\) is 'shared_query'"):
        predict(scorer, val[:1], config=InferConfig(**none), progress=False)
    assert predict(scorer, val[:1], config=InferConfig(**none, allow_layout_mismatch=True), progress=False)
    same = CandidateScorer(loaded, "synthetic", "paper")
    assert predict(same, val[:1], config=InferConfig(retrieval="none"), progress=False)


# ------------------------------------------------------------------------------ random retrieval
def test_random_query_retrieves_the_neighbours_of_a_random_vector_per_head(root, setup):
    _r, _enc, retrieval, _train, val = setup
    scorer = CandidateScorer(_reader(root), "synthetic", "paper")
    cfg = InferConfig(retrieval="random_query", k_text=2, k_image=3, seed=4)
    recs = predict(scorer, val[:2], retrieval=retrieval, config=cfg, progress=False)
    assert recs == predict(scorer, val[:2], retrieval=retrieval, config=cfg, progress=False)
    ids = [r.id for r in retrieval.records]
    for sample, rec in zip(val[:2], recs):
        q = random_queries(4, [str(sample.id)], retrieval.index.dim)
        want_ids, want_scores = [], []
        for head, k in (("text", 2), ("image", 3)):
            s = q[head].double() @ retrieval.index.head(head).double().T  # brute force over every row
            top = s[0].topk(k)
            want_ids += [ids[n] for n in top.indices.tolist()]
            want_scores += top.values.tolist()
        assert [c.id for c in rec.candidates] == want_ids
        assert [c.head for c in rec.candidates] == ["text"] * 2 + ["image"] * 3
        assert [c.score for c in rec.candidates] == pytest.approx(want_scores, abs=1e-2)  # fp16 index
        w = torch.softmax(torch.tensor([c.score for c in rec.candidates], dtype=torch.float64), 0)
        probs = torch.tensor([c.probs for c in rec.candidates], dtype=torch.float64)
        fused = torch.tensor(rec.fused_probs, dtype=torch.float64)
        torch.testing.assert_close(fused, (w[:, None] * probs).sum(0), atol=1e-5, rtol=0)
    assert not torch.equal(*random_queries(4, ["a"], 8).values())  # one draw per head
    # random_records (random, as before): uniform records, no scores
    old = predict(scorer, val[:1], retrieval=retrieval, config=InferConfig(retrieval="random"), progress=False)
    assert InferConfig(retrieval="random").retrieval == "random_records"
    assert all(c.score == 0.0 and c.head == "random" for c in old[0].candidates)
    assert result_options(cfg, get_task("synthetic"))["retrieval"] == "random_query"


# ------------------------------------------------------------------------------ open VQA
def test_open_vqa_paper_marginal_equals_unbatched_teacher_forcing(root, setup):
    _r, _enc, retrieval, _train, val = setup
    reader = _reader(root)
    task = get_task("vqa_rad_open")
    cands = [retrieval.candidate(n) for n in (3, 40, 77)]
    qimg, question = val[0].load_image(), "what abnormality is seen?"
    _answers, _lp, tokens = generate_answer_tokens(reader, task, "paper", qimg, question, cands, max_new_tokens=4)
    end = reader.processor.end_of_turn_token_id
    tokens[2] = [tokens[0][0], end] if tokens[0][:1] != [end] else [tokens[0][0] + 1, end]  # a second answer
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    fused, probs = paper_open_answer(reader, task, "paper", qimg, question, cands, tokens, weights)
    distinct = list(dict.fromkeys(tuple(t) for t in tokens))
    assert len(distinct) >= 2
    want: dict = {}
    for y in distinct:
        p = 0.0
        for k, cand in enumerate(cands):  # one prompt at a time, no padding, no cache
            messages, images = build_messages("paper", task, as_image(qimg), question, cand)
            inputs = reader.encode([as_image(i) for i in images], messages)
            L = inputs["input_ids"].shape[1]
            inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([y])], 1)
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
            if "mm_token_type_ids" in inputs:  # the answer's tokens are text (type 0)
                types = inputs["mm_token_type_ids"]
                inputs["mm_token_type_ids"] = torch.cat([types, types.new_zeros(1, len(y))], 1)
            with torch.no_grad():
                logits = reader.hf_model(**inputs).logits[0].double()
            lp = sum(float(torch.log_softmax(logits[L - 1 + t], -1)[tok]) for t, tok in enumerate(y))
            p += float(weights[k]) * math.exp(lp)
        text = reader.processor.decode(list(y), skip_special_tokens=True).strip()
        want[text] = want.get(text, 0.0) + p
    assert probs == pytest.approx(want, rel=1e-4, abs=1e-12)
    assert fused == max(want, key=lambda a: want[a])
    vote = InferConfig(open_fusion="vote")
    assert result_options(vote, task)["open_fusion"] == "vote" and InferConfig().open_fusion == "paper"


# ------------------------------------------------------------------------------ LoRA vision
@pytest.fixture(scope="module")
def pixtral_dir(tmp_path_factory):
    return tiny.build("pixtral", tmp_path_factory.mktemp("pixtral") / "reader")


def _vision(reader, params: dict) -> dict:
    tower = reader.family_facts.vision_modules[0]
    return {n: p for n, p in params.items() if f".{tower}." in f".{n}"}


@pytest.mark.parametrize("family", ["qwen2_vl", "pixtral"])
def test_lora_on_the_vision_tower_only_when_asked_and_gradients_reach_it(root, pixtral_dir, family, tmp_path):
    path = root / "reader" if family == "qwen2_vl" else pixtral_dir
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = load_reader(path, device="cpu", lora=True)
        torch.manual_seed(0)
        seeing = load_reader(path, device="cpu", lora={"vision": True})
    assert not _vision(plain, plain.lora_parameters()) and plain.lora.vision is False
    adapted = _vision(seeing, seeing.lora_parameters())
    # every linear layer of the tower's blocks, and nothing else of the tower (Qwen2-VL's merger,
    # the patch embedding), has an adapter
    tower = seeing.family_facts.vision_modules[0]
    container = {"qwen2_vl": "blocks", "pixtral": "transformer.layers"}[family]
    blocks = getattr(plain.hf_model.model, tower).get_submodule(container)
    linears = {f"{container}.{n}" for n, m in blocks.named_modules() if isinstance(m, torch.nn.Linear)}
    wrapped = {n.split(f"{tower}.", 1)[1].rsplit(".lora_", 1)[0] for n in adapted}
    assert linears and wrapped == linears and all(p.requires_grad for p in adapted.values())
    # a forward with an image, then backward: gradients reach every vision lora_B
    from PIL import Image

    img = Image.new("RGB", (32, 32), (120, 30, 200))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]}]
    seeing.train()
    seeing.logits(seeing.encode([img], messages)).float().pow(2).mean().backward()
    grads = [p.grad for n, p in adapted.items() if "lora_B" in n]
    assert grads and all(g is not None and float(g.abs().sum()) > 0 for g in grads)
    # recorded: in the settings, the fingerprint and the saved adapter
    assert seeing.lora.vision and reader_fingerprint(seeing) != reader_fingerprint(plain)
    saved = save_adapter(seeing, tmp_path / "adapter")
    again = load_reader(path, device="cpu", lora=saved)
    assert again.lora.vision and reader_fingerprint(again) == reader_fingerprint(seeing)


def test_every_named_option_says_what_it_reproduces_in_help(capsys):
    from jomed_fast.cli import main

    def help_of(command):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        return " ".join(capsys.readouterr().out.split())

    s2, pred, s1 = help_of("train-retriever"), help_of("predict"), help_of("train-reader")
    assert "--add_prior_to_gold_score" in s2 and "reference_double_softmax_gold" in s2
    assert "--candidate-query {mixed,unmixed}" in s2 and "--allow-layout-mismatch" in s2
    assert "random_query: the authors' code's --random_query" in pred and "--open-fusion {paper,vote}" in pred
    assert "--allow-layout-mismatch" in pred and "--lora-vision" in s1
