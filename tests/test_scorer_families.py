"""The candidate scorer beyond the paper's two families: Qwen2.5-VL and a generic family (LLaVA with
a CLIP tower and a Llama decoder, read through its own ``LlavaProcessor``), refusals, and scoring
that builds no autograd graph unless a gradient is asked for.

Exactness: ``CandidateScorer.score`` against every full prompt run alone through the *unmodified*
Hugging Face class (``Qwen2_5_VLForConditionalGeneration`` / ``LlavaForConditionalGeneration``)
on the inputs of the *Hugging Face* processor (``Qwen2_5_VLProcessor`` minus its torchvision video
processor; ``LlavaProcessor`` as ``AutoProcessor`` loads it), so neither the project's placeholder
expansion nor its positions reach the reference. Qwen2.5-VL's M-RoPE positions are also checked
against ``Qwen2_5_VLModel.get_rope_index`` in ``test_scorer_stages``.
"""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from jomed_fast import prompts
from jomed_fast.memory import describe, measured_module_bytes, plan, weight_bytes
from jomed_fast.memory.plan import Run
from jomed_fast.readers import ReaderProcessor, families, load_reader, tiny
from jomed_fast.readers.image_formats import ProcessorImages
from jomed_fast.scoring import Candidate, CandidateScorer
from jomed_fast.tasks import Task, get_task

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-4
SINGLE = get_task("synthetic")
MULTI = Task(
    name="multi_token",
    kind="multiclass",
    labels=("benign", "malignant", "10", "1", "normal"),
    question="What is the finding?",
    instructions="Answer benign, malignant, normal, 1 or 10.\n",
)
CAPTIONS = ["a small round anechoic cyst", "irregular spiculated mass", "", "normal", "fat lobule"]
TWO_IMAGES = [
    {
        "role": "user",
        "content": [
            {"type": "image"},
            {"type": "text", "text": "background: a small round nevus\n\n"},
            {"type": "image"},
            {"type": "text", "text": "What is the diagnosis? Answer 0 or 10."},
        ],
    }
]


def _image(h, w, seed):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def _queries(B, K, pad, seed=0):
    qimgs = [_image(40 + 16 * b, 56 - 14 * b, seed + b) if pad else _image(42, 42, seed + b) for b in range(B)]
    cands = [
        [
            Candidate(
                _image(28 + 14 * (k % 3), 28 + 14 * ((k + b) % 2), seed + 100 + 17 * b + k), CAPTIONS[(k + b) % 5]
            )
            if pad
            else Candidate(_image(42, 42, seed + 100 + 17 * b + k), "a small round cyst")
            for k in range(K)
        ]
        for b in range(B)
    ]
    return qimgs, cands


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {arch: tiny.build(arch, root / arch) for arch in tiny.ALL_ARCHS}


@pytest.fixture(scope="module")
def readers(ckpt):
    return {arch: load_reader(ckpt[arch], device="cpu") for arch in tiny.EXTRA_ARCHS}


def _hf_processor(arch, path):
    """The Hugging Face processor of the checkpoint (no torchvision: PIL image processors)."""
    from transformers import AutoProcessor, AutoTokenizer, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if arch == "llava":
        return AutoProcessor.from_pretrained(path, local_files_only=True)

    class NoVideoProcessor(Qwen2_5_VLProcessor):  # HF's processor minus the torchvision video processor
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)
    return NoVideoProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template)


@pytest.fixture(scope="module")
def hf(ckpt):
    out = {}
    for arch in tiny.EXTRA_ARCHS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = tiny.model_class(arch).from_pretrained(ckpt[arch], local_files_only=True, dtype=torch.float32)
        out[arch] = (model.eval(), _hf_processor(arch, ckpt[arch]))
    return out


def _hf_encode(hf_proc, messages, images):
    text = hf_proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    kwargs = {"images": images} if images else {}
    return dict(hf_proc(text=[text], return_tensors="pt", add_special_tokens=False, **kwargs))


@torch.no_grad()
def reference(model, hf_proc, task, layout, qimgs, cands, verbalizer, multi):
    """Every full prompt alone through the unmodified HF model on its HF processor's inputs: ``[B, K, C]``."""
    B, K, C = len(qimgs), len(cands[0]), verbalizer.num_classes
    out = torch.empty(B, K, C, dtype=torch.float64)
    allowed = list(verbalizer.allowed_token_ids)
    for b in range(B):
        for k in range(K):
            messages, images = prompts.build_messages(layout, task, qimgs[b], None, cands[b][k])
            enc = _hf_encode(hf_proc, messages, images)
            if not multi:
                logits = model(**enc, use_cache=False).logits[0, -1].double()
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
                logits = model(**e, use_cache=False).logits[0, P - 1 : P - 1 + len(seq)].double()
                lp = torch.log_softmax(logits[:, allowed], -1)
                out[b, k, c] = sum(lp[t, allowed.index(tok)] for t, tok in enumerate(seq))
    return out


# ---------------------------------------------------------------------------------- the readers
def test_the_readers_are_the_hf_classes_with_their_family_facts(readers, hf):
    q, g = readers["qwen2_5_vl"], readers["llava"]
    assert q.family == "qwen2_5_vl" and type(q.hf_model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert q.processor.mrope and q.processor.merge_size == 2 and not q.family_facts.generic
    assert g.family == "llava" and type(g.hf_model).__name__ == "LlavaForConditionalGeneration"
    assert g.family_facts.generic and not g.processor.mrope
    assert g.family_facts.vision_modules == ("vision_tower", "multi_modal_projector")
    for reader in (q, g):
        assert reader.image_token_id == reader.hf_model.config.image_token_id
        tower = {id(p) for p in reader.vision_parameters()}
        lm = {id(p) for p in reader.decoder.parameters()}
        assert tower and not tower & lm
        assert len(tower) + len(lm) + 1 == len(list(reader.hf_model.parameters()))  # + the untied lm_head
    # the generic placeholder: what LlavaProcessor expands an image into, (crop / patch)^2 tokens
    hf_proc = hf["llava"][1]
    enc = _hf_encode(hf_proc, TWO_IMAGES, [_image(50, 40, 0), _image(30, 70, 1)])
    assert int((enc["input_ids"] == g.image_token_id).sum()) == 2 * (32 // 8) ** 2


@pytest.mark.parametrize("arch", tiny.EXTRA_ARCHS)
def test_our_encoding_equals_the_hf_processor(readers, hf, arch):
    proc = readers[arch].processor
    images = [_image(50, 40, 0), _image(30, 70, 1)]
    ours = proc.encode(images, TWO_IMAGES)
    theirs = _hf_encode(hf[arch][1], TWO_IMAGES, images)
    assert set(ours) == set(theirs) - {"token_type_ids"}
    for key, value in ours.items():
        assert torch.equal(theirs[key].to(value.dtype), value), key
    with torch.no_grad():
        assert torch.equal(readers[arch].logits(ours), hf[arch][0](**theirs).logits)


# ---------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("pad", [False, True], ids=["equal", "padded"])
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("layout", prompts.LAYOUTS)
@pytest.mark.parametrize("arch", tiny.EXTRA_ARCHS)
def test_single_token_scores_equal_separate_hf_forwards(readers, hf, arch, layout, K, pad):
    reader, (model, hf_proc) = readers[arch], hf[arch]
    qimgs, cands = _queries(2, K, pad, seed=K)
    scorer = CandidateScorer(reader, SINGLE, layout)
    got = scorer.score(qimgs, None, cands)
    assert got.shape == (2, K, 5) and got.dtype == torch.float32
    want = reference(model, hf_proc, SINGLE, layout, qimgs, cands, scorer.verbalizer, multi=False)
    torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=0)
    assert scorer.last_stats.vision_images == 2 + 2 * K


@pytest.mark.parametrize("layout", prompts.LAYOUTS)
@pytest.mark.parametrize("arch", tiny.EXTRA_ARCHS)
def test_multi_token_scores_equal_restricted_teacher_forcing(readers, hf, arch, layout):
    reader, (model, hf_proc) = readers[arch], hf[arch]
    qimgs, cands = _queries(2, 3, pad=True, seed=50)
    raw = CandidateScorer(reader, MULTI, layout, normalize=False)
    assert raw.head.mode == "sequence" and raw.head.num_nodes > 1
    got = raw.score(qimgs, None, cands)
    want = reference(model, hf_proc, MULTI, layout, qimgs, cands, raw.verbalizer, multi=True)
    torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=0)
    # chunked by a small budget: the same scores, scattered back to [B, K] order
    small = CandidateScorer(reader, MULTI, layout, normalize=False, memory_budget=2 * raw.last_stats.row_bytes)
    torch.testing.assert_close(small.score(qimgs, None, cands), got, atol=1e-5, rtol=0)
    assert small.last_stats.chunks > 1


# ---------------------------------------------------------------------------------- refusals
def _gemma3_config():
    from transformers import Gemma3Config

    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, head_dim=32)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
    return Gemma3Config(text_config=text, vision_config=vision)


def test_families_the_scorer_cannot_take_exactly_are_refused_by_name():
    from transformers import BertConfig, Idefics3Config, LlavaNextConfig, Qwen3VLConfig

    cases = [
        (_gemma3_config(), "gemma3 family cannot be scored exactly: its image tokens attend to each other"),
        (Idefics3Config(), "idefics3 family cannot be scored exactly: its processor tiles each image"),
        (LlavaNextConfig(), "llava_next family cannot be scored exactly: its processor tiles each image"),
        (BertConfig(), "expected a vision-language checkpoint .* got model_type 'bert'"),
    ]
    tiny_qwen3 = Qwen3VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(hidden_size=64, intermediate_size=128, depth=1, num_heads=2, out_hidden_size=64),
    )
    cases.append((tiny_qwen3, "qwen3_vl family cannot be scored exactly: its M-RoPE positions"))
    for config, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            families.family_of(config)
        assert "\n" not in str(info.value)


def test_load_reader_refuses_a_gemma3_checkpoint_before_loading_weights(ckpt, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "gemma3"
    path.mkdir()
    _gemma3_config().save_pretrained(path)
    save_file({}, str(path / "model.safetensors"))  # never read: the family is refused first
    (path / "tokenizer.json").write_text((ckpt["llava"] / "tokenizer.json").read_text())
    with pytest.raises(ValueError, match=r"^path: the gemma3 family cannot be scored exactly: .*bidirectionally"):
        load_reader(path, device="cpu")


def test_a_processor_that_tiles_images_is_refused_at_the_first_image(readers):
    from transformers import LlavaProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    reader = readers["llava"]
    tiling = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=[[32, 64], [64, 32]]
    )
    hf_proc = LlavaProcessor(image_processor=tiling, tokenizer=reader.tokenizer, patch_size=8)
    fmt = ProcessorImages("llava", hf_proc, patch_size=8, image_token_id=reader.image_token_id)
    with pytest.raises(ValueError, match=r"images: the llava image processor also returns \['image_sizes'\]"):
        fmt.preprocess([_image(40, 70, 0)])
    assert fmt.count(fmt.slice(reader.processor.preprocess_images([_image(40, 40, 0)]), 0, 1)) == 1


def test_the_processor_is_checked_against_the_checkpoint_family(ckpt):
    with pytest.raises(ValueError, match=r"family: .* holds a 'qwen2_5_vl' checkpoint, got family 'qwen2_vl'"):
        ReaderProcessor.from_pretrained(ckpt["qwen2_5_vl"], "qwen2_vl")
    assert ReaderProcessor.from_pretrained(ckpt["llava"], "llava").image_token == "<image>"


# ---------------------------------------------------------------------------------- autograd
@pytest.mark.parametrize("arch", tiny.ALL_ARCHS)
def test_a_frozen_reader_builds_no_graph_whatever_the_grad_mode(ckpt, arch):
    reader = load_reader(ckpt[arch], device="cpu")
    assert reader.trainable_parameters() == {}
    grad_modes = []
    hooks = [
        m.register_forward_pre_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
        for m in (reader.decoder, reader.hf_model.model.get_submodule(reader.family_facts.vision_modules[0]))
    ]
    qimgs, cands = _queries(1, 2, pad=True, seed=3)
    scorer = CandidateScorer(reader, SINGLE, "shared_query")
    try:
        with torch.enable_grad():
            scores = scorer.score(qimgs, None, cands)
    finally:
        for h in hooks:
            h.remove()
    assert scores.grad_fn is None and not scores.requires_grad
    assert grad_modes and not any(grad_modes)  # the tower and the decoder ran without autograd
    # parameters a caller turns on are a gradient asked for; torch.no_grad still wins
    reader.decoder.layers[0].mlp.down_proj.weight.requires_grad_(True)
    with torch.enable_grad():
        asked = scorer.score(qimgs, None, cands)
    assert asked.grad_fn is not None
    torch.testing.assert_close(asked.detach(), scores, atol=0, rtol=0)
    with torch.no_grad():
        assert scorer.score(qimgs, None, cands).grad_fn is None


@pytest.mark.parametrize("arch", tiny.EXTRA_ARCHS)
def test_lora_readers_of_the_new_families_score_with_gradients(ckpt, arch):
    reader = load_reader(ckpt[arch], lora=True, device="cpu")
    with torch.no_grad():  # a fresh adapter has B = 0: give it weights so every LoRA matrix gets gradients
        for name, p in reader.lora_parameters().items():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    qimgs, cands = _queries(2, 2, pad=True, seed=21)
    scorer = CandidateScorer(reader, MULTI, "paper")
    scores = scorer.score(qimgs, None, cands)
    assert scores.requires_grad
    (-scores[:, :, 1].mean()).backward()
    grads = [p.grad for p in reader.lora_parameters().values()]
    assert (
        all(g is not None and torch.isfinite(g).all() for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    )
    assert all(p.grad is None for p in reader.vision_parameters())


# ---------------------------------------------------------------------------------- memory planner
def test_the_planner_describes_qwen2_5_vl_and_refuses_a_generic_family(ckpt):
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    path = ckpt["qwen2_5_vl"]
    a = describe(path)
    assert a.family == "qwen2_5_vl"
    assert (a.vision_hidden, a.vision_intermediate, a.vision_heads) == families.vision_dims(
        AutoConfig.from_pretrained(path, local_files_only=True)
    )
    with init_empty_weights():
        model = tiny.model_class("qwen2_5_vl")(AutoConfig.from_pretrained(path, local_files_only=True))
    shapes = sorted(
        (m.in_features, m.out_features, m.bias is not None) for m in model.modules() if isinstance(m, torch.nn.Linear)
    )
    assert sorted((lin.d_in, lin.d_out, lin.bias) for lin in a.linears) == shapes
    counted = sum(lin.numel + (lin.d_out if lin.bias else 0) for lin in a.linears) + sum(a.dense.values())
    assert counted == sum(p.numel() for p in model.parameters())  # every tensor, norms and convs included
    for quant in (None, "nf4"):
        reader = load_reader(path, quantization=quant, device="cpu")
        measured = measured_module_bytes(reader.hf_model)
        predicted = sum(weight_bytes(a, quant or "none", elem=4).values())
        assert abs(predicted - measured) <= 0.02 * measured, (quant, predicted, measured)
    assert plan(path, Run(stage="stage2")).total > 0
    for arch in ("qwen2_vl", "pixtral"):  # the scorer's vision dimensions are the planner's
        config = AutoConfig.from_pretrained(ckpt[arch], local_files_only=True)
        d = describe(ckpt[arch])
        assert families.vision_dims(config) == (d.vision_hidden, d.vision_intermediate, d.vision_heads)
    with pytest.raises(ValueError, match=r"got 'llava' \(vision tower 'clip_vision_model'\)"):
        describe(json.loads((ckpt["llava"] / "config.json").read_text()))
