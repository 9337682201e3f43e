"""Readers over unmodified Hugging Face classes.

Tiny checkpoints of both families are built once per module into a temporary directory; the
readers are compared with the HF classes loaded directly from the same directory.
"""

import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from jomed_fast.readers import (
    IGNORE_INDEX,
    LoraSettings,
    ReaderProcessor,
    load_adapter,
    load_reader,
    save_adapter,
    tiny,
)

ARCHS = tiny.ARCHS
QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is the lesion benign?"}]}]
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


def _image(h, w, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("readers")
    return {arch: tiny.build(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def fp32_readers(ckpt):
    return {arch: load_reader(ckpt[arch], quantization=None, device="cpu") for arch in ARCHS}


@pytest.fixture(scope="module")
def hf_models(ckpt):
    return {arch: tiny.model_class(arch).from_pretrained(ckpt[arch], local_files_only=True).eval() for arch in ARCHS}


# ---------------------------------------------------------------------------------- build
@pytest.mark.parametrize("arch", ARCHS)
def test_build_writes_a_complete_checkpoint(ckpt, arch, tmp_path):
    path = ckpt[arch]
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        tiny.BUILD_STAMP,
    ):
        assert (path / name).is_file(), name
    assert not list(path.glob("*.bin"))
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    assert "chat_template" in tok_cfg
    # rebuilding the same thing is a no-op; a different build into it needs overwrite=True
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert tiny.build(arch, path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="overwrite=True"):
        tiny.build(arch, path, seed=1)
    # the same seed gives the same weights
    from safetensors.torch import load_file

    other = tiny.build(arch, tmp_path / "again")
    a, b = load_file(path / "model.safetensors"), load_file(other / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tokenizers_hold_the_family_special_tokens(fp32_readers):
    tok = fp32_readers["pixtral"].tokenizer
    ids = {
        t: tok.convert_tokens_to_ids(t)
        for t in ("<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]")
    }
    assert ids == {"<s>": 1, "</s>": 2, "[INST]": 3, "[/INST]": 4, "[IMG]": 10, "[IMG_BREAK]": 12, "[IMG_END]": 13}
    qtok = fp32_readers["qwen2_vl"].tokenizer
    q_ids = [qtok.convert_tokens_to_ids(t) for t in tiny.QWEN2_VL_SPECIAL_TOKENS]
    assert q_ids == list(range(q_ids[0], q_ids[0] + len(q_ids)))  # appended after the BPE vocabulary, in order
    for t in (tok, qtok):
        assert len(t("10", add_special_tokens=False)["input_ids"]) == 2  # one token per digit, as the real ones
        text = "What is the diagnosis? Benign (grade 3), 45% - yes!"
        assert t.decode(t(text, add_special_tokens=False)["input_ids"]) == text


# ---------------------------------------------------------------------------------- processor
def test_qwen_processor_matches_hf_processor(fp32_readers):
    from transformers import Qwen2VLProcessor

    class NoVideoProcessor(Qwen2VLProcessor):  # HF's processor minus the torchvision video processor
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    proc = fp32_readers["qwen2_vl"].processor
    hf = NoVideoProcessor(image_processor=proc.image_processor, tokenizer=proc.tokenizer)
    images = [_image(50, 40), _image(30, 70, seed=1)]
    ours = proc.encode(images, TWO_IMAGES)
    theirs = hf(images=images, text=[proc.apply_chat_template(TWO_IMAGES)], return_tensors="pt")
    assert set(ours) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"}
    for key, value in ours.items():
        assert torch.equal(theirs[key].to(value.dtype), value), key


def test_pixtral_processor_expands_rows(fp32_readers):
    proc = fp32_readers["pixtral"].processor
    enc = proc.encode([_image(50, 40)], QUESTION)
    ids = enc["input_ids"][0].tolist()
    assert enc["image_sizes"].tolist() == [[64, 48]]  # 50x40 padded up to whole 16-px patches
    rows, cols = 4, 3
    img, brk, end = proc.image_token_ids
    expected = ([img] * cols + [brk]) * rows
    expected[-1] = end
    start = ids.index(img)
    assert ids[:start] == [1, 3]  # <s>[INST]
    assert ids[start : start + len(expected)] == expected
    assert ids[-1] == 4  # [/INST]
    assert "mm_token_type_ids" not in enc
    with pytest.raises(ValueError, match="placeholder"):
        proc.encode([_image(20, 20), _image(20, 20)], QUESTION)


def test_answer_labels_mask_the_prompt(fp32_readers):
    proc = fp32_readers["qwen2_vl"].processor
    prompt = proc.encode([_image(40, 40)], QUESTION)
    enc = proc.encode([_image(40, 40)], QUESTION, answer="benign")
    n = prompt["input_ids"].shape[1]
    assert torch.equal(enc["input_ids"][:, :n], prompt["input_ids"])
    assert (enc["labels"][:, :n] == IGNORE_INDEX).all()
    target = enc["labels"][0, n:].tolist()
    assert target == proc.tokenize("benign") + [proc.end_of_turn_token_id]


# ---------------------------------------------------------------------------------- fp32 exactness
@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_reader_equals_the_hf_class(fp32_readers, hf_models, arch):
    reader, hf = fp32_readers[arch], hf_models[arch]
    assert type(reader.hf_model) is type(hf) and not reader.has_lora
    enc = reader.encode([_image(50, 40)], QUESTION)
    with torch.no_grad():
        ours = reader.logits(enc)
        theirs = hf(**enc).logits
        hidden = reader.hidden_states(enc)
        last = reader.hidden_states(enc, positions=torch.tensor([enc["input_ids"].shape[1] - 1]))
    assert torch.equal(ours, theirs)
    assert hidden.shape == (*enc["input_ids"].shape, reader.hidden_size)
    assert reader.lm_head_weight().shape == (reader.vocab_size, reader.hidden_size)
    torch.testing.assert_close(hidden @ reader.lm_head_weight().T, ours, rtol=1e-5, atol=1e-5)
    assert torch.equal(last, hidden[:, -1])
    assert reader.image_token_id == hf.config.image_token_id
    assert (enc["input_ids"] == reader.image_token_id).sum() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_batch_equals_single_prompts(fp32_readers, arch):
    reader = fp32_readers[arch]
    a, b = [_image(50, 40)], [_image(30, 60, seed=1), _image(56, 56, seed=2)]
    with torch.no_grad():
        single = [reader.logits(reader.encode(a, QUESTION))[0, -1], reader.logits(reader.encode(b, TWO_IMAGES))[0, -1]]
        for side in ("left", "right"):
            enc = reader.encode_batch([(a, QUESTION), (b, TWO_IMAGES)], padding_side=side)
            logits = reader.logits(enc)
            lengths = enc["attention_mask"].sum(1)
            for row in range(2):
                pos = -1 if side == "left" else int(lengths[row]) - 1
                torch.testing.assert_close(logits[row, pos], single[row], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------- NF4 + LoRA
def _perturb_lora(reader, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in reader.lora_parameters().values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("arch", ARCHS)
def test_nf4_lora_reader_and_adapter_round_trip(ckpt, fp32_readers, arch, tmp_path):
    import bitsandbytes as bnb

    reader = load_reader(ckpt[arch], quantization="nf4", lora=True, device="cpu")
    assert reader.lora == LoraSettings(r=8, alpha=16, dropout=0.0)
    assert reader.compute_dtype == torch.float32
    names = {n: type(m).__name__ for n, m in reader.hf_model.named_modules()}
    quantized = [n for n, m in reader.hf_model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert any(".language_model.layers." in n for n in quantized)
    assert "lm_head" not in quantized and names["lm_head"] == "Linear"
    lora_modules = {n.split(".lora_")[0] for n in reader.lora_parameters()}
    assert lora_modules and all(".language_model.layers." in n for n in lora_modules)
    n_layers = reader.num_layers
    assert len(lora_modules) == 7 * n_layers  # q k v o gate up down in every decoder layer
    assert {p.requires_grad for n, p in reader.model.named_parameters()} == {True, False}
    assert all("lora_" in n for n in reader.trainable_parameters())

    enc = reader.encode([_image(50, 40)], QUESTION)
    with torch.no_grad():
        fresh = reader.logits(enc)  # B = 0: a fresh adapter changes nothing
        base = reader.model.get_base_model()
        with reader.model.disable_adapter():
            no_adapter = reader.logits(enc)
    assert torch.equal(fresh, no_adapter)
    assert torch.isfinite(fresh).all()
    with torch.no_grad():  # NF4 stays close to the fp32 model it quantizes
        ref = fp32_readers[arch].logits(enc)
    assert (fresh - ref).abs().mean() < 0.5 * ref.std()
    assert base is reader.hf_model

    _perturb_lora(reader, seed=7)
    with torch.no_grad():
        trained = reader.logits(enc)
    assert not torch.equal(trained, fresh)
    adapter = save_adapter(reader, tmp_path / "adapter")
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    assert not list(adapter.glob("*.bin"))

    again = load_reader(ckpt[arch], quantization="nf4", lora=adapter, device="cpu")
    assert again.lora == reader.lora and not again.trainable_parameters()
    with torch.no_grad():
        assert torch.equal(again.logits(enc), trained)
    # loading into a reader that already has an adapter replaces its weights
    _perturb_lora(again, seed=8)
    load_adapter(again, adapter, trainable=True)
    assert again.trainable_parameters()
    with torch.no_grad():
        assert torch.equal(again.logits(enc), trained)


@pytest.mark.parametrize("arch", ARCHS)
def test_nf4_lora_training_step_changes_only_lora(ckpt, arch):
    reader = load_reader(ckpt[arch], quantization="nf4", lora={"r": 4}, device="cpu").train()
    assert reader.lora.r == 4 and reader.lora.alpha == 16
    enc = reader.encode([_image(50, 40)], QUESTION, answer="benign")
    before = {n: p.detach().clone() for n, p in reader.model.named_parameters()}
    opt = torch.optim.AdamW(reader.trainable_parameters().values(), lr=1e-2)
    loss = reader(**enc).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in reader.model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert all(torch.isfinite(g).all() for g in grads.values())
    opt.step()
    changed = {n for n, p in reader.model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)
    reader.eval()
    with torch.no_grad():
        assert torch.isfinite(reader.logits(enc)).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_int8_reader_forward(ckpt, fp32_readers, arch):
    import bitsandbytes as bnb

    reader = load_reader(ckpt[arch], quantization="int8", device="cpu")
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in reader.decoder.modules())
    enc = reader.encode([_image(50, 40)], QUESTION)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # the per-matmul fp16 cast warning is silenced
        logits = reader.logits(enc)
        ref = fp32_readers[arch].logits(enc)
    assert torch.isfinite(logits).all()
    assert (logits - ref).abs().mean() < 0.2 * ref.std()


# ---------------------------------------------------------------------------------- small
@pytest.mark.parametrize("arch", ARCHS)
def test_small_keeps_the_speed_deciding_proportions(arch):
    cfg = tiny.make_config(arch, "small")
    text = cfg.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    proc = tiny.make_image_processor(arch, "small")
    assert head_dim == 128
    assert text.num_hidden_layers < 10
    if arch == "qwen2_vl":
        assert text.vocab_size == 151_936
        assert text.num_attention_heads // text.num_key_value_heads == 28 // 4
        assert text.hidden_size == text.num_attention_heads * 128
        assert cfg.vision_config.patch_size == 14 and cfg.vision_config.spatial_merge_size == 2
        assert cfg.vision_config.temporal_patch_size == 2
        assert text.rope_parameters["mrope_section"] == [16, 24, 24]
        assert cfg.vision_config.embed_dim // cfg.vision_config.num_heads == 1280 // 16
        assert (proc.patch_size, proc.merge_size) == (14, 2)
        assert proc.size["longest_edge"] == 12_845_056 and proc.size["shortest_edge"] == 3136
    else:
        assert text.vocab_size == 131_072
        assert text.num_attention_heads // text.num_key_value_heads == 32 // 8
        assert text.hidden_size / (text.num_attention_heads * head_dim) == 5120 / (32 * 128)
        assert cfg.vision_config.patch_size == 16
        assert cfg.vision_config.hidden_size // cfg.vision_config.num_attention_heads == 1024 // 16
        assert cfg.image_token_id == 10 and cfg.vision_feature_layer == -1
        assert proc.size["longest_edge"] == 1024
    assert tiny.PRESERVED[arch]["kept"]["vocab_size"] == text.vocab_size
    assert tiny.PRESERVED[arch]["kept"]["head_dim"] == head_dim
    assert not text.tie_word_embeddings and not cfg.tie_word_embeddings
    assert arch in tiny.preserved_table()


# ---------------------------------------------------------------------------------- errors
def test_bad_paths_and_arguments_give_clear_errors(ckpt, tmp_path):
    with pytest.raises(ValueError, match="no such directory"):
        load_reader(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="got the file"):
        load_reader(tmp_path / "file.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_reader(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    with pytest.raises(ValueError, match="no model weights"):
        load_reader(empty)
    (empty / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="safetensors only"):
        load_reader(empty)
    with pytest.raises(TypeError, match="path"):
        load_reader(123)
    bert = tmp_path / "bert"
    bert.mkdir()
    for name in ("model.safetensors", "tokenizer.json"):
        os.symlink(ckpt["qwen2_vl"] / name, bert / name)
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert'"):
        load_reader(bert)
    with pytest.raises(ValueError, match="quantization"):
        load_reader(ckpt["qwen2_vl"], quantization="int4")
    with pytest.raises(ValueError, match="adapter directory"):
        load_reader(ckpt["qwen2_vl"], lora=tmp_path / "no_adapter")
    with pytest.raises(ValueError, match="lora: unknown settings"):
        load_reader(ckpt["qwen2_vl"], lora={"rank": 8})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_reader(ckpt["qwen2_vl"], device="cuda")
    with pytest.raises(ValueError, match="arch"):
        tiny.build("llama", tmp_path / "x")
    with pytest.raises(ValueError, match="size"):
        tiny.build("qwen2_vl", tmp_path / "x", size="huge")
    with pytest.raises(ValueError, match="family"):
        ReaderProcessor.from_pretrained(ckpt["qwen2_vl"], "llava")
