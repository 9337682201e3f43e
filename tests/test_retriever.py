import numpy as np
import pytest
import torch

from jomed_fast.data.synthetic import SyntheticGenerator
from jomed_fast.retriever import (
    QueryEncoder,
    TinyCLIP,
    images_to_tensor,
    merge_heads,
    pretrain,
    recall_at_k,
)


@pytest.fixture(scope="module")
def data():
    recs = SyntheticGenerator(index_size=700).index_records(0, 700)
    return recs[:500], recs[500:]


def test_encoders_normalised_and_fingerprint_roundtrip(tmp_path, data):
    tr, _ = data
    m = TinyCLIP.from_captions([r.text for r in tr], width=16, depth=2, dim=32)
    ei = m.encode_images([r.image for r in tr[:5]])
    et = m.encode_texts([r.text for r in tr[:5]])
    assert ei.shape == et.shape == (5, 32)
    torch.testing.assert_close(ei.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(et.norm(dim=-1), torch.ones(5))
    m.save(tmp_path / "m")
    m2 = TinyCLIP.load(tmp_path / "m")
    assert m2.fingerprint() == m.fingerprint()
    torch.testing.assert_close(m2.encode_images([r.image for r in tr[:5]]), ei)
    with torch.no_grad():
        m2.logit_scale += 1
    assert m2.fingerprint() != m.fingerprint()
    with pytest.raises(ValueError, match="path"):
        TinyCLIP.load(tmp_path / "nope")


def test_pretraining_raises_recall(data):
    torch.manual_seed(0)
    tr, te = data
    m = TinyCLIP.from_captions([r.text for r in tr], width=16, depth=2, dim=32)
    xte, cte = images_to_tensor([r.image for r in te]), [r.text for r in te]
    before = recall_at_k(m, xte, cte)
    chance = 10 / len(set(cte))
    pretrain(m, [r.image for r in tr], [r.text for r in tr], epochs=6, batch_size=50, progress=False)
    after = recall_at_k(m, xte, cte)
    print(f"recall@10 before={before:.3f} after={after:.3f} chance~{chance:.3f}")
    assert after > max(2 * chance, before + 0.1)


def test_query_encoder_freezing_mix_refresh(data):
    tr, _ = data
    m = TinyCLIP.from_captions([r.text for r in tr], width=16, depth=3, dim=32)
    q = QueryEncoder(m, n_trainable=10, alpha=0.15)
    assert q.n_trainable == 3
    q1 = QueryEncoder(TinyCLIP.from_captions(["a b"], width=16, depth=3, dim=32), n_trainable=1)
    layers = q1.learned.image_layers()
    assert all(not p.requires_grad for p in layers[0].parameters())
    assert all(p.requires_grad for p in layers[-1].parameters())
    assert not any(p.requires_grad for p in q1.learned.text.parameters())
    assert not any(p.requires_grad for p in q1.frozen.parameters())
    x = images_to_tensor([r.image for r in tr[:4]])
    out = q(x)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(4))
    out.sum().backward()
    with torch.no_grad():
        for p in q.learned.parameters():
            if p.requires_grad:
                p.add_(0.1)
    assert not torch.allclose(q.retrieval_queries(x), q.learned.encode_images(x))
    q.refresh()
    torch.testing.assert_close(q.retrieval_queries(x), q.learned.encode_images(x))
    with pytest.raises(ValueError, match="alpha"):
        QueryEncoder(m, alpha=2.0)


def test_merge_heads():
    t = (torch.tensor([[0.9, 0.5]]), torch.tensor([[3, 1]]))
    i = (torch.tensor([[0.8, 0.7]]), torch.tensor([[1, 2]]))
    c = merge_heads(t, i)
    assert c.ids.tolist() == [[3, 1, 1, 2]] and c.heads == [["text", "text", "image", "image"]]


def _tiny_hf_clip(path):
    """A tiny Hugging Face CLIP (model, tokenizer, image processor) saved in ``path``."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        PreTrainedTokenizerFast,
    )

    cfg = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            vocab_size=50,
            max_position_embeddings=16,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(path)
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(["a", "lesion", "breast", "normal", "mass"])}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_hf_clip_takes_float_and_16_bit_images_as_the_same_picture(tmp_path):
    from PIL import Image

    from jomed_fast.retriever.hf import HFCLIPEncoder

    enc = HFCLIPEncoder(_tiny_hf_clip(tmp_path))
    u8 = np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    grey = u8[..., 0]
    sixteen = Image.fromarray(grey.astype(np.uint16) * 257)  # mode I;16, 0..65535: the same picture
    want = enc.encode_images([u8, np.repeat(grey[..., None], 3, 2)])
    got = enc.encode_images([u8.astype(np.float32) / 255.0, sixteen])  # float [0, 1] used to become 0 / 1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_hf_clip_local_dir(tmp_path):
    from jomed_fast.retriever.hf import HFCLIPEncoder

    enc = HFCLIPEncoder(_tiny_hf_clip(tmp_path))
    im = enc.encode_images([np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)] * 2)
    tx = enc.encode_texts(["a breast lesion", "normal"])
    assert im.shape == tx.shape == (2, 16)
    torch.testing.assert_close(im.norm(dim=-1), torch.ones(2))
    assert len(enc.fingerprint()) == 64
    q = QueryEncoder(enc, n_trainable=1)
    assert q.n_trainable == 1
    assert any(p.requires_grad for p in enc.image_layers()[-1].parameters())
    assert not any(p.requires_grad for p in enc.image_layers()[0].parameters())


def test_hf_clip_saved_whole_with_the_modes_of_a_plain_write(tmp_path):
    """``save_encoder`` on an HF encoder: one directory swapped into place, its weights (written by
    safetensors through a 0600 temporary file) with the mode a plain write gives under the umask."""
    import os
    import stat

    from jomed_fast.retriever import load_encoder, save_encoder
    from jomed_fast.retriever.hf import HFCLIPEncoder

    enc = HFCLIPEncoder(_tiny_hf_clip(tmp_path / "src"))
    before = os.umask(0o022)
    try:
        out = save_encoder(enc, tmp_path / "out")
        out = save_encoder(enc, tmp_path / "out")  # a second save replaces the first
    finally:
        os.umask(before)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes and set(modes.values()) == {0o644} and stat.S_IMODE(out.stat().st_mode) == 0o755, modes
    assert "model.safetensors" in modes and sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    again = load_encoder(out)
    texts = ["a breast lesion", "normal"]
    torch.testing.assert_close(again.encode_texts(texts), enc.encode_texts(texts))
