"""The FLOP model (``jomed_fast.scoring.flops``): hand-computed counts on toy shapes, and the
counts torch's ``FlopCounterMode`` reads off the tiny readers' forwards (eager attention, so the
attention products are counted too: dense rectangles, as an explicit-mask kernel computes them)."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from jomed_fast import prompts
from jomed_fast.readers import load_reader, tiny
from jomed_fast.scoring import Candidate
from jomed_fast.scoring import flops as F
from jomed_fast.tasks import get_task

# Counter-vs-model tolerance: the model leaves out rotary-embedding products (the position
# outer products the counter sees as bmm), which are < 0.1% of the tiny readers' forwards.
RTOL = 5e-3

DEC = F.DecoderShape(hidden=4, layers=1, heads=2, kv_heads=1, head_dim=2, intermediate=8, vocab=10)


# ---------------------------------------------------------------------------------- by hand
def test_decoder_counts_by_hand():
    # q = 4, g = 2: 2 * (4*4 + 2*4*2 + 4*4 + 3*4*8) = 288 per token per layer
    assert F.decoder_linear_flops(DEC, 1) == 288
    assert F.decoder_linear_flops(dataclass_replace(DEC, layers=3), 5) == 3 * 5 * 288
    # 3 new tokens after 2 cached: keys seen 3 + 4 + 5 = 12; 4 * q * 12 = 192
    assert F.attention_flops(DEC, 3, cached=2) == 192
    assert F.attention_flops(DEC, 3, cached=2, causal=False) == 4 * 4 * (3 * 2 + 9)
    assert F.decoder_flops(DEC, 3, cached=2) == 3 * 288 + 192
    assert F.head_flops(DEC, 2) == 2 * 2 * 4 * 10
    assert F.head_flops(DEC, 2, columns=3) == 2 * 2 * 4 * 3


def dataclass_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def test_vision_counts_by_hand():
    qwen = F.VisionShape(family="qwen2_vl", hidden=2, layers=1, intermediate=8, patch_inputs=3, merge=4, out_hidden=5)
    n = 8
    embed = 2 * n * 3 * 2
    block = 2 * n * (4 * 4 + 2 * 2 * 8) + 4 * n * n * 2
    merger = 2 * (n // 4) * (8 * 8 + 8 * 5)
    assert F.vision_flops(qwen, n) == embed + block + merger
    pix = F.VisionShape(family="pixtral", hidden=2, layers=2, intermediate=3, patch_inputs=3, merge=1, out_hidden=5)
    assert F.vision_flops(pix, 4) == 2 * 4 * 3 * 2 + 2 * (2 * 4 * (4 * 4 + 3 * 2 * 3) + 4 * 16 * 2) + 2 * 4 * (
        2 * 5 + 25
    )


def test_methods_compose_the_blocks():
    vis = F.VisionShape(family="pixtral", hidden=2, layers=1, intermediate=3, patch_inputs=3, merge=1, out_hidden=4)

    def img(key, n):
        return (key, n)

    # two queries, K = 2, shared_query-like: prefix (query image + question) then candidate
    prompts_ = [
        F.Prompt(prefix=("q0", 6), suffix=3, images=(img("Q0", 4), img("c0", 2))),
        F.Prompt(prefix=("q0", 6), suffix=5, images=(img("Q0", 4), img("c1", 2))),
        F.Prompt(prefix=("q1", 7), suffix=3, images=(img("Q1", 4), img("c0", 2))),
        F.Prompt(prefix=("q1", 7), suffix=4, images=(img("Q1", 4), img("c2", 2))),
    ]
    hf = F.hf_forward_flops(DEC, vis, prompts_)
    assert hf.vision == 4 * F.vision_flops(vis, 4) + 4 * F.vision_flops(vis, 2)
    assert hf.llm == sum(F.decoder_flops(DEC, p.tokens) for p in prompts_)
    assert hf.head == 4 * F.head_flops(DEC, 1)
    ours = F.shared_prefix_flops(DEC, vis, prompts_, num_classes=3)
    assert ours.vision == 2 * F.vision_flops(vis, 4) + 3 * F.vision_flops(vis, 2)  # c0 once
    assert ours.llm == (
        F.decoder_flops(DEC, 6)
        + F.decoder_flops(DEC, 7)
        + F.decoder_flops(DEC, 3, 6)
        + F.decoder_flops(DEC, 5, 6)
        + F.decoder_flops(DEC, 3, 7)
        + F.decoder_flops(DEC, 4, 7)
    )
    assert ours.head == 4 * F.head_flops(DEC, 1, 3)
    # sequence mode: N trie nodes after each suffix, A allowed tokens at 1 + N positions
    seq = F.shared_prefix_flops(DEC, vis, prompts_[:1], num_classes=3, class_nodes=2, allowed_tokens=5)
    assert seq.llm == F.decoder_flops(DEC, 6) + F.decoder_flops(DEC, 3 + 2, 6)
    assert seq.head == F.head_flops(DEC, 3, 5)
    # generate without a cache: step j recomputes the prompt + j tokens; images at step 0
    gen = F.generate_flops(DEC, vis, prompts_[:2], steps=[3, 1])
    assert gen.llm == sum(F.decoder_flops(DEC, 9 + j) for j in range(3)) + F.decoder_flops(DEC, 11)
    assert gen.head == 4 * F.head_flops(DEC, 1)
    assert gen.vision == F.hf_forward_flops(DEC, vis, prompts_[:2]).vision
    every = F.generate_flops(DEC, vis, prompts_[:2], steps=[3, 1], images_every_step=True)
    assert every.vision == gen.vision + 2 * (F.vision_flops(vis, 4) + F.vision_flops(vis, 2))
    assert F.generate_flops(DEC, vis, prompts_, 1) == hf
    assert F.predicted_speedup(hf, ours) == pytest.approx(hf.total / ours.total)
    assert (hf + ours).total == hf.total + ours.total


def test_shared_query_saving_grows_with_k():
    dec = F.DecoderShape(hidden=256, layers=2, heads=4, kv_heads=2, head_dim=64, intermediate=512, vocab=1000)
    vis = F.VisionShape(
        family="qwen2_vl", hidden=32, layers=2, intermediate=128, patch_inputs=1176, merge=4, out_hidden=256
    )
    speedups = []
    for K in (1, 4, 16, 50):
        ps = [F.Prompt(prefix=("q", 100), suffix=30, images=(("Q", 16), (k, 16))) for k in range(K)]
        speedups.append(F.predicted_speedup(F.hf_forward_flops(dec, vis, ps), F.shared_prefix_flops(dec, vis, ps, 3)))
    assert speedups == sorted(speedups) and speedups[-1] > 3
    assert speedups[-1] < (100 + 30) / 30 * 1.5  # bounded by (P + S) / S, plus the head saving


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="DecoderShape.hidden"):
        F.DecoderShape(hidden=0, layers=1, heads=1, kv_heads=1, head_dim=1, intermediate=1, vocab=1)
    with pytest.raises(ValueError, match="VisionShape.family"):
        F.VisionShape(family="clip", hidden=1, layers=1, intermediate=1, patch_inputs=1, merge=1, out_hidden=1)
    with pytest.raises(ValueError, match="tokens"):
        F.decoder_flops(DEC, -1)
    with pytest.raises(ValueError, match="prompts"):
        F.hf_forward_flops(DEC, None, [])
    with pytest.raises(ValueError, match="steps"):
        F.generate_flops(DEC, None, [F.Prompt(prefix=("p", 1), suffix=1)], steps=[1, 2])
    with pytest.raises(ValueError, match="allowed_tokens"):
        F.shared_prefix_flops(DEC, None, [F.Prompt(prefix=("p", 1), suffix=1)], 2, class_nodes=1)
    with pytest.raises(ValueError, match="Prompt"):
        F.Prompt(prefix=("p", 0), suffix=0)
    with pytest.raises(ValueError, match="method"):
        F.predicted_speedup(F.Flops(1, 1, 1), F.Flops())


def test_small_configs_give_the_documented_shapes():
    dec = F.decoder_shape(tiny.make_config("qwen2_vl", "small"))
    assert dec == F.DecoderShape(
        hidden=896, layers=4, heads=7, kv_heads=1, head_dim=128, intermediate=4736, vocab=151_936
    )
    vis = F.vision_shape(tiny.make_config("qwen2_vl", "small"))
    assert (vis.family, vis.hidden, vis.layers, vis.intermediate, vis.patch_inputs, vis.merge, vis.out_hidden) == (
        "qwen2_vl",
        320,
        2,
        1280,
        3 * 2 * 14 * 14,
        4,
        896,
    )
    pix = F.vision_shape(tiny.make_config("pixtral", "small"))
    assert (pix.family, pix.hidden, pix.intermediate, pix.patch_inputs, pix.merge) == ("pixtral", 256, 1024, 768, 1)
    assert F.decoder_shape(tiny.make_config("pixtral", "small")).head_dim == 128
    with pytest.raises(ValueError, match="config"):
        F.vision_shape(tiny.make_config("qwen2_vl", "small").text_config)


# ---------------------------------------------------------------------------------- torch's counter
@pytest.fixture(scope="module")
def readers(tmp_path_factory):
    root = tmp_path_factory.mktemp("flops")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for arch in tiny.ARCHS:
            reader = load_reader(tiny.build(arch, root / arch), device="cpu")
            reader.hf_model.set_attn_implementation("eager")  # attention as counted matmuls
            out[arch] = reader
    return out


def _image(h, w, seed):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def _counted(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _patches(reader, enc) -> list[int]:
    if reader.family == "qwen2_vl":
        return [int(t * h * w) for t, h, w in enc["image_grid_thw"].tolist()]
    p = reader.processor.patch_size
    return [(int(h) // p) * (int(w) // p) for h, w in enc["image_sizes"].tolist()]


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_vision_tower_matches_the_counter(readers, arch):
    reader = readers[arch]
    images = [_image(40, 56, 1), _image(64, 64, 2)]
    enc = reader.processor.preprocess_images(images)
    vis = F.vision_shape(reader.config)
    model = reader.hf_model.model
    if arch == "qwen2_vl":
        got = _counted(lambda: model.get_image_features(enc["pixel_values"], enc["image_grid_thw"]))
    else:
        # one image per call (Pixtral attends across a call's images), cropped to its size (the
        # patch convolution runs over the batch's padding too)
        sizes = enc["image_sizes"].tolist()
        got = sum(
            _counted(
                lambda i=i, h=h, w=w: model.get_image_features(
                    pixel_values=enc["pixel_values"][i : i + 1, :, :h, :w], image_sizes=enc["image_sizes"][i : i + 1]
                )
            )
            for i, (h, w) in enumerate(sizes)
        )
    want = sum(F.vision_flops(vis, n) for n in _patches(reader, enc))
    assert got == pytest.approx(want, rel=RTOL)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_full_forward_matches_the_counter(readers, arch):
    """The whole HF forward of one multimodal prompt (what ``hf_batched`` runs per prompt):
    vision + decoder (dense attention rectangle under eager) + the full head at one position."""
    reader = readers[arch]
    task = get_task("synthetic")
    qimg, cand = _image(48, 48, 3), Candidate(_image(40, 32, 4), "a small round cyst")
    messages, images = prompts.build_messages("paper", task, qimg, None, cand)
    enc = reader.processor.encode(images, messages)
    L = int(enc["input_ids"].shape[1])
    dec, vis = F.decoder_shape(reader.config), F.vision_shape(reader.config)
    got = _counted(lambda: reader.hf_model(**enc, use_cache=False, logits_to_keep=1))
    if arch == "pixtral":
        # the tower runs both images in one call: attention across them (dense), and the patch
        # convolution over the batch's padding (images padded to the largest)
        n = _patches(reader, enc)
        across = 4 * vis.layers * vis.hidden * (sum(n) ** 2 - sum(k * k for k in n))
        H, W = (int(x) // reader.processor.patch_size for x in enc["pixel_values"].shape[-2:])
        padding = 2 * sum(H * W - k for k in n) * vis.patch_inputs * vis.hidden
        vision = sum(F.vision_flops(vis, k) for k in n) + across + padding
    else:
        vision = sum(F.vision_flops(vis, k) for k in _patches(reader, enc))
    want = vision + F.decoder_linear_flops(dec, L) + F.attention_flops(dec, L, causal=False) + F.head_flops(dec, 1)
    assert got == pytest.approx(want, rel=RTOL)
    # and the model's own method count differs from this only by causal vs dense attention
    prompt = F.Prompt(prefix=("p", 0), suffix=L, images=tuple((i, n) for i, n in enumerate(_patches(reader, enc))))
    model = F.hf_forward_flops(dec, vis, [prompt])
    dense_minus_causal = F.attention_flops(dec, L, causal=False) - F.attention_flops(dec, L)
    assert model.llm + model.head + dense_minus_causal == F.decoder_linear_flops(dec, L) + F.attention_flops(
        dec, L, causal=False
    ) + F.head_flops(dec, 1)
