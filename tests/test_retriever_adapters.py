"""The retriever adapters against the unmodified library models they wrap.

Tiny random-weight models are built in code from the libraries' own classes: transformers'
``CLIPModel`` / ``SiglipModel``, a remote-code model laid out as jina-clip-v1 (``tests/jina_like``,
loaded through ``auto_map`` with ``trust_remote_code``), and open_clip models made by
``open_clip.create_model`` from small configs registered here (BiomedCLIP's timm ViT + Hugging Face
BERT towers, an EVA tower, open_clip's own ViT). For each family:

* the embeddings are the library model's own ``get_image_features`` / ``get_text_features``
  (open_clip: ``encode_image`` / ``encode_text``) divided by their norms;
* the trainable set of stage 2 is exactly the last N image blocks plus what follows them to the
  joint space, and one optimizer step over every parameter changes nothing else;
* the trained model saved by jomed_fast loads with the library alone and embeds the same.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from jomed_fast.retriever import QueryEncoder, load_encoder, save_encoder  # noqa: E402
from jomed_fast.retriever.blocks import find_blocks, modules_after  # noqa: E402

JINA_LIKE = Path(__file__).parent / "jina_like"
WORDS = ["a", "lesion", "breast", "normal", "mass", "chest", "x", "ray"]
TEXTS = ["a breast lesion", "normal chest x ray", "mass"]


def unit(x: torch.Tensor) -> torch.Tensor:
    """Rows divided by their float64 norms (an independent normalisation)."""
    x = x.detach().double()
    return (x / x.norm(dim=-1, keepdim=True)).float()


def pictures(n: int = 3, size: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def save_word_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(path)


def towers(vision_layers: int = 3) -> dict:
    common = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2)
    return dict(
        text_config=dict(
            common, num_hidden_layers=2, vocab_size=50, max_position_embeddings=16, bos_token_id=1, eos_token_id=2
        ),
        vision_config=dict(common, num_hidden_layers=vision_layers, image_size=32, patch_size=8),
    )


def build_clip(path: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    torch.manual_seed(0)
    CLIPModel(CLIPConfig(**towers(), projection_dim=16)).save_pretrained(path)
    save_word_tokenizer(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def build_siglip(path: Path) -> Path:
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel

    torch.manual_seed(0)
    SiglipModel(SiglipConfig(**towers())).save_pretrained(path)
    save_word_tokenizer(path)
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def build_jina_like(path: Path) -> Path:
    """The jina-like model saved with its code, as jina-clip-v1's hub directory is."""
    from transformers import AutoConfig, AutoModel, CLIPImageProcessorPil

    path.mkdir(parents=True)
    for f in ("configuration_jina_like.py", "modeling_jina_like.py"):
        shutil.copy(JINA_LIKE / f, path / f)
    auto_map = {
        "AutoConfig": "configuration_jina_like.JinaLikeConfig",
        "AutoModel": "modeling_jina_like.JinaLikeModel",
    }
    (path / "config.json").write_text(json.dumps({"model_type": "jina_like_clip", "auto_map": auto_map}))
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    torch.manual_seed(0)
    AutoModel.from_config(config, trust_remote_code=True).save_pretrained(path)
    assert json.loads((path / "config.json").read_text())["auto_map"] == auto_map
    save_word_tokenizer(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


BUILDERS = {"clip": build_clip, "siglip": build_siglip, "remote_code": build_jina_like}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: build(root / name) for name, build in BUILDERS.items()}


def library_model(family: str, path: Path):
    """The unmodified library model and its tokenizer / image processor, loaded without jomed_fast."""
    import transformers

    if family == "clip":
        model = transformers.CLIPModel.from_pretrained(path)
        processor = transformers.CLIPImageProcessorPil.from_pretrained(path)
    elif family == "siglip":
        model = transformers.SiglipModel.from_pretrained(path)
        processor = transformers.SiglipImageProcessorPil.from_pretrained(path)
    else:
        model = transformers.AutoModel.from_pretrained(path, trust_remote_code=True)
        processor = transformers.AutoImageProcessor.from_pretrained(path, trust_remote_code=True)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(path), processor


def library_embeddings(family: str, path: Path, images, texts) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    model, tokenizer, processor = library_model(family, path)
    pv = processor(images=[Image.fromarray(a) for a in images], return_tensors="pt")["pixel_values"]
    # SigLIP was trained on texts padded to the full length (its model card's usage)
    padding = dict(padding="max_length", max_length=16) if family == "siglip" else dict(padding=True)
    tok = tokenizer(texts, return_tensors="pt", **padding)
    with torch.no_grad():
        im = model.get_image_features(pixel_values=pv)
        tx = model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    # transformers' own classes return a model output with the projected pooler_output
    im, tx = (t if isinstance(t, torch.Tensor) else t.pooler_output for t in (im, tx))
    return unit(im), unit(tx)


# the trainable set of n=2 last blocks, written out per family from the library's module names
TRAINABLE = {
    "clip": (
        ["model.vision_model.encoder.layers.1.", "model.vision_model.encoder.layers.2."],
        ["model.vision_model.post_layernorm.", "model.visual_projection."],
    ),
    "siglip": (
        ["model.vision_model.encoder.layers.1.", "model.vision_model.encoder.layers.2."],
        ["model.vision_model.post_layernorm.", "model.vision_model.head."],
    ),
    "remote_code": (
        ["model.vision_model.blocks.1.", "model.vision_model.blocks.2."],
        ["model.vision_model.norm.", "model.vision_model.head."],
    ),
}


@pytest.mark.parametrize("family", list(BUILDERS))
def test_embeddings_are_the_library_models_own(family, model_dirs):
    enc = load_encoder(model_dirs[family], trust_remote_code=family == "remote_code")
    want_im, want_tx = library_embeddings(family, model_dirs[family], pictures(), TEXTS)
    with torch.no_grad():
        got_im, got_tx = enc.encode_images(pictures()), enc.encode_texts(TEXTS)
    assert got_im.shape == want_im.shape == (3, enc.dim) and got_tx.shape == (3, enc.dim)
    torch.testing.assert_close(got_im, want_im, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_tx, want_tx, atol=1e-5, rtol=1e-5)
    assert len(enc.fingerprint()) == 64


@pytest.mark.parametrize("family", list(BUILDERS))
def test_last_blocks_train_and_the_saved_model_loads_without_jomed_fast(family, model_dirs, tmp_path):
    enc = load_encoder(model_dirs[family], trust_remote_code=family == "remote_code")
    untrained = enc.fingerprint()
    q = QueryEncoder(enc, n_trainable=2)
    blocks, heads = TRAINABLE[family]
    names = [n for n, _ in enc.named_parameters()]
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == {n for n in names if n.startswith(tuple(blocks + heads))}
    assert all(any(n.startswith(prefix) for n in trainable) for prefix in blocks + heads)

    before = {n: p.detach().clone() for n, p in enc.named_parameters()}
    opt = torch.optim.SGD(enc.parameters(), lr=1.0)  # every parameter: only the trainable get gradients
    target = torch.randn(3, enc.dim, generator=torch.Generator().manual_seed(1))
    (q(pictures()) * target).sum().backward()
    opt.step()
    changed = {n for n, p in enc.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable
    assert all(any(n.startswith(prefix) for n in changed) for prefix in blocks + heads), sorted(changed)

    out = save_encoder(enc, tmp_path / "trained")
    with torch.no_grad():
        trained_im, trained_tx = enc.encode_images(pictures()), enc.encode_texts(TEXTS)
    want_im, want_tx = library_embeddings(family, out, pictures(), TEXTS)
    torch.testing.assert_close(want_im, trained_im, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(want_tx, trained_tx, atol=1e-5, rtol=1e-5)
    again = load_encoder(out, trust_remote_code=family == "remote_code")
    assert again.fingerprint() == enc.fingerprint() != untrained


def test_remote_code_runs_only_when_the_caller_allows_it(model_dirs):
    with pytest.raises(ValueError, match="trust_remote_code.*expected trust_remote_code=True"):
        load_encoder(model_dirs["remote_code"])


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4)])  # a list inside a block: not the stack


class _Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.trunk = nn.Module()
        self.trunk.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 8), _Inner()) for _ in range(3)])
        self.trunk.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)


def test_block_search_takes_the_stack_and_what_follows_it():
    tower = _Tower()
    path, blocks = find_blocks(tower, "tower")
    assert path == "trunk.blocks" and blocks is tower.trunk.blocks
    assert modules_after(tower, path) == [tower.trunk.norm, tower.head]
    with pytest.raises(ValueError, match="tower: expected a ModuleList .or Sequential. of transformer blocks"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)), "tower")


# ---------------------------------------------------------------------------------------- open_clip
def import_open_clip():
    """open_clip, or a skip where it is not installed (``.ci/openclip_env.sh`` installs it for CI).

    The torchvision wheels on the public index are CUDA builds; beside a CPU torch their C++ ops do
    not load, which torchvision 0.28 survives except for two fake-kernel registrations it makes
    unguarded (``torchvision::nms``, ``qnms``). Declaring those two schemas first lets its Python
    transforms import; open_clip uses no torchvision op."""
    import importlib.util

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip: torchvision not installed (see .ci/openclip_env.sh)")
    # the build's tag is in version.py (the wheel's metadata says 0.28.0 for every build)
    build = (Path(list(spec.submodule_search_locations)[0]) / "version.py").read_text()
    if "+cu" in build and torch.version.cuda is None and "torchvision" not in sys.modules:
        for op in ("nms", "qnms"):
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return pytest.importorskip("open_clip")


def tiny_bert(path: Path) -> str:
    from transformers import BertConfig

    BertConfig(
        vocab_size=len(WORDS) + 2, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(path)
    return str(path)


OPEN_CLIP_VISION = {
    # BiomedCLIP's layout: a timm ViT trunk (token pooling, linear projection) and a BERT text tower
    "biomedclip": dict(image_size=224, timm_model_name="vit_tiny_patch16_224", timm_pool="", timm_proj="linear"),
    # EVA-CLIP's: a timm EVA-02 trunk whose head projects
    "eva": dict(image_size=224, timm_model_name="eva02_tiny_patch14_224", timm_pool="token", timm_proj=None),
    # open_clip's own ViT (the OpenAI / LAION CLIP towers): transformer.resblocks, ln_post, a bare proj matrix
    "vit": dict(image_size=32, layers=3, width=32, head_width=16, patch_size=8),
}
OPEN_CLIP_TRAINABLE = {
    "biomedclip": (
        ["model.visual.trunk.blocks.10.", "model.visual.trunk.blocks.11."],
        ["model.visual.trunk.norm.", "model.visual.head."],
    ),
    "eva": (
        ["model.visual.trunk.blocks.10.", "model.visual.trunk.blocks.11."],
        ["model.visual.trunk.norm.", "model.visual.trunk.head."],
    ),
    "vit": (
        ["model.visual.transformer.resblocks.1.", "model.visual.transformer.resblocks.2."],
        ["model.visual.ln_post.", "model.visual.proj"],
    ),
}


def build_open_clip(path: Path, kind: str) -> Path:
    """A tiny open_clip model in the hub layout (``open_clip_config.json`` + safetensors weights)."""
    open_clip = import_open_clip()
    from safetensors.torch import save_file

    if kind == "biomedclip":
        text = dict(
            hf_model_name=tiny_bert(path.parent / f"{path.name}-bert"),
            hf_tokenizer_name=str(path),  # with local-dir: open_clip reads the tokenizer beside the weights
            hf_proj_type="mlp",
            hf_pooler_type="cls_last_hidden_state_pooler",
            context_length=16,
        )
    else:
        text = dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=2)
    size = OPEN_CLIP_VISION[kind]["image_size"]
    config = {
        "model_cfg": {"embed_dim": 16, "vision_cfg": OPEN_CLIP_VISION[kind], "text_cfg": text, "custom_text": True},
        "preprocess_cfg": {"size": size, "mean": [0.5] * 3, "std": [0.5] * 3},
    }
    path.mkdir(parents=True)
    if kind == "biomedclip":
        save_word_tokenizer(path)
    (path / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{path}", pretrained_image=False, pretrained_text=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    return path


def open_clip_embeddings(path: Path, images, texts) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip alone: ``create_model_and_transforms`` / ``get_tokenizer`` on the directory."""
    from PIL import Image

    open_clip = import_open_clip()
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}", pretrained_text=False)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    with torch.no_grad():
        im = model.eval().encode_image(torch.stack([preprocess(Image.fromarray(a)) for a in images]))
        tx = model.encode_text(tokenizer(texts))
    return unit(im), unit(tx)


@pytest.mark.parametrize("kind", list(OPEN_CLIP_VISION))
def test_open_clip_embeds_as_open_clip_trains_its_last_blocks_and_saves_its_layout(kind, tmp_path):
    source = build_open_clip(tmp_path / kind, kind)
    enc = load_encoder(source)
    want_im, want_tx = open_clip_embeddings(source, pictures(), TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(enc.encode_images(pictures()), want_im, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(enc.encode_texts(TEXTS), want_tx, atol=1e-5, rtol=1e-5)
    assert want_im.shape == (3, enc.dim)

    untrained = enc.fingerprint()
    q = QueryEncoder(enc, n_trainable=2)
    blocks, heads = OPEN_CLIP_TRAINABLE[kind]
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in enc.named_parameters() if n.startswith(tuple(blocks + heads))}
    before = {n: p.detach().clone() for n, p in enc.named_parameters()}
    opt = torch.optim.SGD(enc.parameters(), lr=1.0)
    target = torch.randn(3, enc.dim, generator=torch.Generator().manual_seed(1))
    (q(pictures()) * target).sum().backward()
    opt.step()
    changed = {n for n, p in enc.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable
    assert all(any(n.startswith(prefix) for n in changed) for prefix in blocks + heads), sorted(changed)

    out = save_encoder(enc, tmp_path / "trained")
    want_im, want_tx = open_clip_embeddings(out, pictures(), TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(enc.encode_images(pictures()), want_im, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(enc.encode_texts(TEXTS), want_tx, atol=1e-5, rtol=1e-5)
    assert load_encoder(out).fingerprint() == enc.fingerprint() != untrained
