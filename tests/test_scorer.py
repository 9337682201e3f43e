"""The batched candidate scorer.

Exactness: ``CandidateScorer.score`` against every full prompt run separately through the
*unmodified* Hugging Face class loaded from the same directory (``Qwen2VLForConditionalGeneration``
/ ``LlavaForConditionalGeneration``), class log-probs read from its full-vocabulary logits — both
families, both layouts, K in {1, 3, 8}, with and without padding, fp32 and NF4, single-token and
multi-token classes (NF4 on the portable CPU kernel, the reader's default, on both; on CPUs with
AVX512-BF16 also bitsandbytes' packed bf16 kernel, to within bf16 rounding). Then what is shared
(vision, prefix), chunking, errors, LoRA training.
"""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from jomed_fast import prompts
from jomed_fast.data import IndexRecord
from jomed_fast.readers import load_reader, quantization, tiny
from jomed_fast.scoring import Candidate, CandidateScorer
from jomed_fast.tasks import Task, get_task

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-4
# bitsandbytes' packed kernel rounds every layer's input and output to bf16 (2^-8 relative), and
# which roundings happen depends on the batch: measured up to 0.039 on the cases below (a wrong
# layout or position moves scores by O(1))
PACKED_ATOL = 0.1
SINGLE = get_task("synthetic")  # labels "0".."4": one token each
MULTI = Task(
    name="multi_token",
    kind="multiclass",
    labels=("benign", "malignant", "10", "1", "normal"),
    question="What is the finding?",
    instructions="Answer benign, malignant, normal, 1 or 10.\n",
)
CAPTIONS = [
    "a small round anechoic cyst",
    "irregular spiculated hypoechoic mass with posterior shadowing",
    "normal",
    "oval circumscribed mass, wider than tall",
    "punctate echogenic foci",
    "",
    "fat lobule",
    "breast ultrasound showing a simple cyst with enhancement",
]


def _image(h, w, seed):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def _queries(B, K, pad, seed=0):
    # without padding every query image and every candidate has the same size and caption: all
    # B*K suffixes have the same length in both layouts
    qimgs = [_image(40 + 16 * b, 56 - 14 * b, seed + b) if pad else _image(42, 42, seed + b) for b in range(B)]
    cands = []
    for b in range(B):
        row = []
        for k in range(K):
            s = seed + 100 + 17 * b + k
            if pad:
                row.append(Candidate(_image(28 + 14 * (k % 3), 28 + 14 * ((k + b) % 2), s), CAPTIONS[(k + 3 * b) % 8]))
            else:
                row.append(Candidate(_image(42, 42, s), "a small round cyst"))
        cands.append(row)
    return qimgs, cands


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorer")
    return {arch: tiny.build(arch, root / arch) for arch in tiny.ARCHS}


def _nf4_config():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=["lm_head"],
    )


class _Models:
    """Readers and reference HF models, loaded once per (arch, quantization)."""

    def __init__(self, ckpt):
        self.ckpt, self._readers, self._hf = ckpt, {}, {}

    def reader(self, arch, quant, cpu_kernel="dequantize"):
        if (arch, quant, cpu_kernel) not in self._readers:
            reader = load_reader(self.ckpt[arch], quantization=quant, device="cpu", cpu_kernel=cpu_kernel)
            for p in reader.model.parameters():  # inference: no autograd graph
                p.requires_grad_(False)
            self._readers[arch, quant, cpu_kernel] = reader
        return self._readers[arch, quant, cpu_kernel]

    def hf(self, arch, quant):
        if (arch, quant) not in self._hf:
            kwargs = {"local_files_only": True, "dtype": torch.float32}
            if quant == "nf4":
                kwargs.update(quantization_config=_nf4_config(), device_map={"": "cpu"})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = tiny.model_class(arch).from_pretrained(self.ckpt[arch], **kwargs).eval()
            if quant == "nf4":  # the reader's default CPU kernel (bitsandbytes would repack on AVX512-BF16)
                quantization.set_cpu_kernel(model, "dequantize")
            self._hf[arch, quant] = model
        return self._hf[arch, quant]


@pytest.fixture(scope="module")
def models(ckpt):
    return _Models(ckpt)


@torch.no_grad()
def reference(hf, processor, task, layout, qimgs, questions, cands, verbalizer, multi, normalize=False):
    """Every full prompt alone through the unmodified HF model: ``[B, K, C]`` (float64)."""
    B, K, C = len(qimgs), len(cands[0]), verbalizer.num_classes
    out = torch.empty(B, K, C, dtype=torch.float64)
    allowed = list(verbalizer.allowed_token_ids)
    for b in range(B):
        for k in range(K):
            q = None if questions is None else questions[b]
            messages, images = prompts.build_messages(layout, task, qimgs[b], q, cands[b][k])
            enc = processor.encode(images, messages)
            if not multi:
                logits = hf(**enc, use_cache=False).logits[0, -1].double()
                out[b, k] = torch.log_softmax(logits[list(verbalizer.class_token_ids)], -1)
                continue
            P = enc["input_ids"].shape[1]
            for c in range(C):
                seq = list(verbalizer.sequence(c))
                e = dict(enc)
                e["input_ids"] = torch.cat([enc["input_ids"], torch.tensor([seq])], 1)
                e["attention_mask"] = torch.ones_like(e["input_ids"])
                if "mm_token_type_ids" in enc:
                    zeros = torch.zeros(1, len(seq), dtype=enc["mm_token_type_ids"].dtype)
                    e["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], zeros], 1)
                logits = hf(**e, use_cache=False).logits[0, P - 1 : P - 1 + len(seq)].double()
                lp = torch.log_softmax(logits[:, allowed], -1)
                out[b, k, c] = sum(lp[t, allowed.index(tok)] for t, tok in enumerate(seq))
    return torch.log_softmax(out, -1) if normalize else out


# ---------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("quant", [None, "nf4"], ids=["fp32", "nf4"])
@pytest.mark.parametrize("pad", [False, True], ids=["equal", "padded"])
@pytest.mark.parametrize("K", [1, 3, 8])
@pytest.mark.parametrize("layout", prompts.LAYOUTS)
@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_single_token_scores_equal_separate_hf_forwards(models, arch, layout, K, pad, quant):
    reader, hf = models.reader(arch, quant), models.hf(arch, quant)
    qimgs, cands = _queries(2, K, pad, seed=K)
    scorer = CandidateScorer(reader, SINGLE, layout)
    assert scorer.head.mode == "first_token"
    got = scorer.score(qimgs, None, cands)
    assert got.shape == (2, K, 5) and got.dtype == torch.float32 and got.grad_fn is None
    want = reference(hf, reader.processor, SINGLE, layout, qimgs, None, cands, scorer.verbalizer, multi=False)
    torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=0)
    s = scorer.last_stats
    padded = s.suffix_slots > s.suffix_tokens
    assert padded == pad  # padded: the suffixes differ in length (within or across queries)


@pytest.mark.skipif(
    not quantization.cpu_has_packed_kernel(),
    reason="this CPU has no AVX512-BF16: bitsandbytes' packed NF4 kernel does not run here",
)
@pytest.mark.parametrize("task", [SINGLE, MULTI], ids=["single_token", "multi_token"])
@pytest.mark.parametrize("layout", prompts.LAYOUTS)
@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_packed_nf4_kernel_scores_equal_the_dequantized_reference_to_bf16(models, arch, layout, task):
    reader = models.reader(arch, "nf4", cpu_kernel="packed")
    assert reader.cpu_kernel == "packed"
    qimgs, cands = _queries(2, 3, pad=True, seed=70)
    scorer = CandidateScorer(reader, task, layout, normalize=False)
    got = scorer.score(qimgs, None, cands)
    nf4_layers = [n for n, m in reader.hf_model.named_modules() if type(m).__name__ == "Linear4bit"]
    assert nf4_layers and quantization.packed_layers(reader.hf_model) == nf4_layers  # the packed kernel ran
    multi = scorer.head.mode == "sequence"
    want = reference(
        models.hf(arch, "nf4"), reader.processor, task, layout, qimgs, None, cands, scorer.verbalizer, multi=multi
    )
    assert quantization.packed_layers(models.hf(arch, "nf4")) == []  # and the reference did not
    torch.testing.assert_close(got.double(), want, atol=PACKED_ATOL, rtol=0)
    assert (got.double() - want).abs().max() > 0  # bf16 rounding shows: the kernels really differ


@pytest.mark.parametrize("quant", [None, "nf4"], ids=["fp32", "nf4"])
@pytest.mark.parametrize("K", [1, 3, 8])
@pytest.mark.parametrize("layout", prompts.LAYOUTS)
@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_multi_token_scores_equal_restricted_teacher_forcing(models, arch, layout, K, quant):
    reader, hf = models.reader(arch, quant), models.hf(arch, quant)
    qimgs, cands = _queries(2, K, pad=True, seed=50 + K)
    raw = CandidateScorer(reader, MULTI, layout, normalize=False)
    v = raw.verbalizer
    assert raw.head.mode == "sequence" and not v.first_tokens_unique  # "1" and "10" share their first token
    assert max(len(s) for s in v.sequences) > 1
    got = raw.score(qimgs, None, cands)
    want = reference(hf, reader.processor, MULTI, layout, qimgs, None, cands, v, multi=True)
    torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=0)
    normalized = CandidateScorer(reader, MULTI, layout).score(qimgs, None, cands)
    torch.testing.assert_close(normalized.double(), torch.log_softmax(want, -1), atol=ATOL, rtol=0)
    assert torch.allclose(normalized.exp().sum(-1), torch.ones(2, K))
    assert raw.last_stats.class_tokens == 2 * K * raw.head.num_nodes


@pytest.mark.parametrize("layout", prompts.LAYOUTS)
@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_mixed_candidate_kinds_and_query_variants(models, arch, layout):
    reader, hf = models.reader(arch, None), models.hf(arch, None)
    arr = (np.random.RandomState(7).rand(30, 44, 3) * 255).astype(np.uint8)
    shared = _image(28, 28, 8)
    qimgs = [_image(40, 40, 1), np.asarray(_image(56, 28, 2)), None]
    raw = [
        [Candidate(arr, "from an array"), {"image": shared, "text": "a dict"}, (shared, "a tuple"), None],
        [
            IndexRecord(id="r", image_path=None, text="an index record", image=arr),
            Candidate(None, "caption only"),
            Candidate(_image(42, 28, 3), ""),
            Candidate(arr / 255.0, "floats"),
        ],
        [Candidate(shared, "no query image"), None, Candidate(None, "text"), Candidate(arr, "x")],
    ]
    questions = [None, "Which class is it?", None]
    scorer = CandidateScorer(reader, SINGLE, layout)
    got = scorer.score(qimgs, questions, raw)
    # the reference sees the same prompts with the inputs converted the way the scorer documents
    conv = [[None if c is None else prompts.as_candidate(c) for c in row] for row in raw]
    conv = [
        [c if c is None or c.image is None else Candidate(prompts.as_image(c.image), c.text) for c in row]
        for row in conv
    ]
    q_conv = [None if q is None else prompts.as_image(q) for q in qimgs]
    want = reference(hf, reader.processor, SINGLE, layout, q_conv, questions, conv, scorer.verbalizer, multi=False)
    torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=0)


def test_eager_attention_gives_the_same_scores(ckpt, models):
    reader = load_reader(ckpt["qwen2_vl"], device="cpu")
    reader.hf_model.set_attn_implementation("eager")
    qimgs, cands = _queries(2, 3, pad=True, seed=3)
    with torch.no_grad():
        eager = CandidateScorer(reader, MULTI, "shared_query").score(qimgs, None, cands)
    sdpa = CandidateScorer(models.reader("qwen2_vl", None), MULTI, "shared_query").score(qimgs, None, cands)
    torch.testing.assert_close(eager, sdpa, atol=ATOL, rtol=0)


def test_stale_rope_deltas_are_never_read(models):
    reader = models.reader("qwen2_vl", None)
    qimgs, cands = _queries(2, 3, pad=True, seed=4)
    scorer = CandidateScorer(reader, SINGLE, "shared_query")
    before = scorer.score(qimgs, None, cands)
    reader.hf_model.model.rope_deltas = torch.tensor([[1000]])
    try:
        after = scorer.score(qimgs, None, cands)
    finally:
        reader.hf_model.model.rope_deltas = None
    torch.testing.assert_close(after, before, atol=0, rtol=0)


# ---------------------------------------------------------------------------------- sharing, chunking
def _count_vision_images(reader):
    """Images through the vision tower, counted by a forward hook."""
    counter = {"images": 0, "calls": 0}
    model = reader.hf_model.model
    if reader.family == "qwen2_vl":

        def hook(module, args, kwargs):
            grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            counter["images"] += int(grid.shape[0])
            counter["calls"] += 1

        handle = model.visual.register_forward_pre_hook(hook, with_kwargs=True)
    else:

        def hook(module, args, kwargs):
            pv = args[0] if args else kwargs["pixel_values"]
            counter["images"] += int(pv.shape[0])
            counter["calls"] += 1

        handle = model.vision_tower.register_forward_pre_hook(hook, with_kwargs=True)
    return counter, handle


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_each_image_and_prefix_runs_once(models, arch):
    reader = models.reader(arch, None)
    B, K = 3, 4
    qimgs, cands = _queries(B, K, pad=True, seed=9)
    cands[2][3] = cands[0][1]  # the same index record retrieved for two queries
    decoder_calls = []
    handle_dec = reader.decoder.register_forward_pre_hook(
        lambda m, a, kw: decoder_calls.append(kw["inputs_embeds"].shape), with_kwargs=True
    )
    counter, handle_vis = _count_vision_images(reader)
    try:
        for layout, prefix_rows in (("shared_query", B), ("paper", 1)):
            counter["images"] = 0
            decoder_calls.clear()
            scorer = CandidateScorer(reader, SINGLE, layout)
            scorer.score(qimgs, None, cands)
            s = scorer.last_stats
            assert counter["images"] == s.vision_images == B + B * K - 1
            assert s.prefix_rows == prefix_rows
            assert decoder_calls[0][0] == prefix_rows  # one prefix forward: one row per distinct prefix
            # the suffix forwards (length-aware plan) cover the B*K rows once, as the stats say
            assert [tuple(c[:2]) for c in decoder_calls[1:]] == s.chunk_shapes
            assert sum(rows for rows, _ in s.chunk_shapes) == B * K and s.chunks == len(s.chunk_shapes)
            if layout == "shared_query":
                assert s.prefix_tokens > s.suffix_tokens / (B * K)  # the query part is in the prefix
            # fewest forwards: one suffix forward for all rows, padded to the longest
            decoder_calls.clear()
            fewest = CandidateScorer(reader, SINGLE, layout, forward_overhead=float("inf"))
            fewest.score(qimgs, None, cands)
            f = fewest.last_stats
            assert [c[0] for c in decoder_calls[1:]] == [B * K] and f.chunks == 1
            assert f.suffix_slots >= s.suffix_slots > s.suffix_tokens  # the default plan pads no more
    finally:
        handle_dec.remove()
        handle_vis.remove()


def _suffix_shapes(reader):
    """(rows, length) of every decoder forward, by a forward hook (the prefix one included)."""
    calls = []
    handle = reader.decoder.register_forward_pre_hook(
        lambda m, a, kw: calls.append(tuple(kw["inputs_embeds"].shape[:2])), with_kwargs=True
    )
    return calls, handle


@pytest.mark.parametrize("layout", prompts.LAYOUTS)
@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_chunks_come_from_the_memory_budget(models, arch, layout):
    reader = models.reader(arch, None)
    qimgs, cands = _queries(2, 3, pad=True, seed=11)
    whole = CandidateScorer(reader, MULTI, layout, forward_overhead=float("inf"))
    want = whole.score(qimgs, None, cands)
    assert whole.last_stats.chunks == 1
    ((rows, longest),) = whole.last_stats.chunk_shapes  # one forward, every row padded to the longest
    assert (
        rows == 6
        and whole.last_stats.suffix_slots == 6 * longest > whole.last_stats.suffix_tokens + 6 * whole.head.num_nodes
    )
    row_bytes = whole.last_stats.row_bytes  # one row at the longest length
    Pm = whole.last_stats.prefix_slots // max(whole.last_stats.prefix_rows, 1)
    N = whole.head.num_nodes
    for factor in (2.5, 4.5):
        budget = int(factor * row_bytes)
        for overhead in (float("inf"), None, 0.0):
            small = CandidateScorer(reader, MULTI, layout, memory_budget=budget, forward_overhead=overhead)
            calls, handle = _suffix_shapes(reader)
            try:
                got = small.score(qimgs, None, cands)
            finally:
                handle.remove()
            s = small.last_stats
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)  # scattered back to [B, K] order
            assert s.row_bytes == row_bytes and calls[1:] == s.chunk_shapes and s.chunks == len(s.chunk_shapes)
            assert sum(r for r, _ in s.chunk_shapes) == 6
            assert s.suffix_slots == sum(r * n for r, n in s.chunk_shapes) >= s.suffix_tokens + 6 * N
            assert s.rows_per_chunk == max(r for r, _ in s.chunk_shapes)
            # paper: one prefix for all rows, every chunk reads it through the expanded view
            assert s.shared_prefix_chunks == s.chunks if layout == "paper" else 0 <= s.shared_prefix_chunks <= s.chunks
            for rows, length in s.chunk_shapes:  # every chunk within the budget at its own padded length
                assert rows <= small.cost.rows(budget, length, Pm)
            if overhead is None:
                assert s.forward_overhead == small.cost.forward_overhead() > 0
            elif overhead == 0:  # free forwards: every chunk is one length, no padding at all
                assert s.suffix_slots == s.suffix_tokens + 6 * N
            else:  # fewest forwards: no more than the longest row's budget forces
                assert s.chunks <= -(-6 // small.cost.rows(budget, longest, Pm))
        # the budget holds 2 (4) rows of the longest length: the cost model is linear in rows
        assert small.cost.rows(budget, longest, Pm) == (2 if factor == 2.5 else 4)


def _brute_force_cost(lengths, max_rows, overhead):
    """The cheapest partition of the rows into chunks (any partition, not only sorted runs)."""
    best = [float("inf")]

    def cost(chunks):
        return sum(len(c) * max(lengths[r] for r in c) + overhead for c in chunks)

    def rec(i, chunks):
        if i == len(lengths):
            if all(len(c) <= max_rows(max(lengths[r] for r in c)) for c in chunks):
                best[0] = min(best[0], cost(chunks))
            return
        for c in chunks:
            c.append(i)
            rec(i + 1, chunks)
            c.pop()
        chunks.append([i])
        rec(i + 1, chunks)
        chunks.pop()

    rec(0, [])
    return best[0]


def _budget_rows(cap):
    """A budget's ``max_rows``: fewer rows for longer chunks."""
    return lambda n: max(1, cap * 12 // (n + 6))


def test_plan_chunks_is_optimal_and_within_the_budget():
    from jomed_fast.scoring.memory_budget import plan_chunks

    rng = np.random.RandomState(0)
    for trial in range(60):
        R = int(rng.randint(1, 8))
        lengths = [int(x) for x in rng.randint(1, 12, size=R)]
        max_rows = _budget_rows(int(rng.randint(1, 5)))
        overhead = float(rng.choice([0.0, 3.0, 10.0, 40.0]))
        plan = plan_chunks(lengths, max_rows, overhead)
        assert sorted(r for c in plan for r in c) == list(range(R))
        assert all(c == sorted(c, key=lambda r: (lengths[r], r)) for c in plan)
        assert all(len(c) <= max_rows(max(lengths[r] for r in c)) for c in plan)
        got = sum(len(c) * max(lengths[r] for r in c) + overhead for c in plan)
        assert got == _brute_force_cost(lengths, max_rows, overhead), (trial, lengths, overhead, plan)
    # the regimes: equal lengths -> one forward; free forwards -> one per length; inf -> fewest forwards
    assert plan_chunks([5] * 7, lambda n: 100, 0.0) == [list(range(7))]
    assert plan_chunks([3, 9, 3, 9], lambda n: 100, 0.0) == [[0, 2], [1, 3]]
    # one chunk: 4·9 + F slots; two: 2·3 + 2·9 + 2F: split iff F < 12 (a tie keeps fewer forwards)
    assert plan_chunks([3, 9, 3, 9], lambda n: 100, 11.5) == [[0, 2], [1, 3]]
    assert plan_chunks([3, 9, 3, 9], lambda n: 100, 12.0) == [[0, 2, 1, 3]]
    assert plan_chunks([3, 9, 3, 9], lambda n: 100, float("inf")) == [[0, 2, 1, 3]]
    assert plan_chunks([3, 9, 3, 9], lambda n: 2 if n > 3 else 100, float("inf")) == [[0, 2], [1, 3]]
    assert plan_chunks([4] * 5, lambda n: 2, float("inf")) == [[0], [1, 2], [3, 4]]  # ties: longer last runs
    with pytest.raises(ValueError, match="lengths: expected every row length >= 1, got 0"):
        plan_chunks([3, 0], lambda n: 4, 1.0)


def test_row_cost_grows_with_the_sequence(models):
    cost = CandidateScorer(models.reader("pixtral", None), SINGLE).cost
    assert cost.row_bytes(10, 100) < cost.row_bytes(20, 100) < cost.row_bytes(20, 200)
    assert cost.row_bytes(20, 100, grad=True) > cost.row_bytes(20, 100)
    assert cost.rows(10 * cost.row_bytes(20, 100), 20, 100) == 10
    assert cost.rows(1, 20, 100) == 1


def test_profiler_sees_the_stages(models):
    reader = models.reader("qwen2_vl", None)
    qimgs, cands = _queries(1, 2, pad=True)
    scorer = CandidateScorer(reader, SINGLE, "shared_query")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        scorer.score(qimgs, None, cands)
    names = {e.name for e in prof.events()}
    assert {"jomed.vision", "jomed.prefix", "jomed.suffix", "jomed.head"} <= names


# ---------------------------------------------------------------------------------- errors
def test_arguments_are_checked(models):
    reader = models.reader("qwen2_vl", None)
    scorer = CandidateScorer(reader, SINGLE, "paper")
    img = _image(28, 28, 0)
    c = Candidate(img, "x")
    with pytest.raises(ValueError, match=r"candidates\[1\]: expected at least one candidate"):
        scorer.score([img, img], None, [[c], []])
    with pytest.raises(ValueError, match=r"candidates\[1\]: expected K = 2"):
        scorer.score([img, img], None, [[c, c], [c]])
    with pytest.raises(ValueError, match="candidates: expected 2 candidate lists"):
        scorer.score([img, img], None, [[c]])
    with pytest.raises(ValueError, match="questions: expected 2"):
        scorer.score([img, img], ["q"], [[c], [c]])
    with pytest.raises(TypeError, match=r"questions\[0\]"):
        scorer.score([img], [3], [[c]])
    with pytest.raises(ValueError, match="query_images: expected at least one"):
        scorer.score([], None, [])
    with pytest.raises(TypeError, match="query_images"):
        scorer.score(img, None, [[c]])
    with pytest.raises(TypeError, match=r"candidates\[0\]\[1\]"):
        scorer.score([img], None, [[c, 42]])
    with pytest.raises(ValueError, match=r"candidates\[0\]\[0\]\.image"):
        scorer.score([img], None, [[Candidate(np.zeros((2, 2, 2, 2)), "x")]])
    with pytest.raises(ValueError, match=r"candidates\[0\]\[0\]\.text"):
        scorer.score([img], None, [[Candidate(img, "<|image_pad|>")]])
    with pytest.raises(ValueError, match=r"questions\[0\]: task 'vqa_rad_closed' has no fixed question"):
        CandidateScorer(reader, "vqa_rad_closed").score([img], None, [[c]])
    with pytest.raises(ValueError, match="layout"):
        CandidateScorer(reader, SINGLE, "interleaved")
    with pytest.raises(ValueError, match="task"):
        CandidateScorer(reader, "vqa_rad_open")
    with pytest.raises(TypeError, match="reader"):
        CandidateScorer(reader.hf_model, SINGLE)
    with pytest.raises(ValueError, match="memory_budget"):
        CandidateScorer(reader, SINGLE, memory_budget=0)
    for bad in (-1.0, float("nan"), "1", True):
        with pytest.raises(ValueError, match="forward_overhead: expected None or a number of token slots"):
            CandidateScorer(reader, SINGLE, forward_overhead=bad)
    with pytest.raises(ValueError, match="class_mode"):
        CandidateScorer(reader, SINGLE, class_mode="greedy")
    with pytest.raises(ValueError, match="share their first token"):
        CandidateScorer(reader, MULTI, class_mode="first_token")


def test_unsupported_attention_is_refused(models, monkeypatch):
    reader = models.reader("pixtral", None)
    monkeypatch.setattr(reader.decoder.config, "_attn_implementation", "flash_attention_2")
    with pytest.raises(ValueError, match="reader: .*flash_attention_2"):
        CandidateScorer(reader, SINGLE)


# ---------------------------------------------------------------------------------- training
@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_nf4_lora_reader_scores_and_trains(ckpt, arch):
    reader = load_reader(ckpt[arch], quantization="nf4", lora=True, device="cpu")
    with torch.no_grad():  # a fresh adapter has B = 0: give it weights so every LoRA matrix gets gradients
        for name, p in reader.lora_parameters().items():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    qimgs, cands = _queries(2, 3, pad=True, seed=21)
    target = torch.tensor([1, 3])
    for layout in prompts.LAYOUTS:
        scorer = CandidateScorer(reader, MULTI, layout)
        with torch.no_grad():
            frozen = scorer.score(qimgs, None, cands)
        assert frozen.grad_fn is None
        reader.train()
        scores = scorer.score(qimgs, None, cands)
        assert scores.requires_grad
        torch.testing.assert_close(scores.detach(), frozen, atol=1e-5, rtol=0)
        loss = -scores[torch.arange(2), :, target].mean()
        reader.model.zero_grad()
        loss.backward()
        grads = {n: p.grad for n, p in reader.lora_parameters().items()}
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
        assert sum(float(g.abs().sum()) for g in grads.values()) > 0
        assert all(float(g.abs().sum()) > 0 for n, g in grads.items() if "layers.0." in n)

        # chunked + gradient-checkpointed: the same gradients
        chunked = CandidateScorer(reader, MULTI, layout, memory_budget=2 * scorer.last_stats.row_bytes)
        reader.model.zero_grad()
        loss2 = -chunked.score(qimgs, None, cands)[torch.arange(2), :, target].mean()
        loss2.backward()
        assert chunked.last_stats.chunks > 1
        for n, p in reader.lora_parameters().items():
            torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4)

        # one small optimizer step lowers the loss
        opt = torch.optim.SGD(list(reader.lora_parameters().values()), lr=1e-2)
        reader.model.zero_grad()
        loss = -scorer.score(qimgs, None, cands)[torch.arange(2), :, target].mean()
        loss.backward()
        opt.step()
        reader.eval()
        with torch.no_grad():
            after = -scorer.score(qimgs, None, cands)[torch.arange(2), :, target].mean()
        assert after < loss.detach()
