"""Quantized readers on every CPU: which layers bitsandbytes quantizes, which CPU kernel runs them.

* Every linear layer of the built readers fits the widths of bitsandbytes' packed NF4 kernel, and
  a checkpoint with layers that do not loads with exactly those layers in the compute dtype (named
  in a warning, in ``Reader.unquantized_layers`` and in the fingerprint) instead of crashing.
* ``quantize_vision=False`` really keeps the vision tower and projector out of the quantization.
* NF4 runs the portable kernel by default on every CPU, and LoRA gradients after an eval pass
  equal those of the same adapter on the dequantized fp32 weights (bitsandbytes' own repacking
  would drop them on CPUs with AVX512-BF16).
* On CPUs with AVX512-BF16 the packed kernel runs on request, frozen and refusing gradients; on
  CPUs without, asking for it is a named error. One of the two ``packed`` tests skips: which one
  names the kind of CPU the suite ran on.
"""

import dataclasses
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from jomed_fast.readers import load_reader, quantization, tiny
from jomed_fast.readers.fingerprint import reader_fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_PACKED = quantization.cpu_has_packed_kernel()
QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is the lesion benign?"}]}]


def _image(seed=0, h=44, w=36):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def _linear_widths(model):
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _nf4_names(model):
    import bitsandbytes as bnb

    return [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    return {arch: tiny.build(arch, root / arch) for arch in tiny.ARCHS}


# Vision towers 32 wide: the widths of the tiny readers before they were made to fit the kernel.
_NARROW_VISION = {
    "qwen2_vl": {"embed_dim": 32},
    "pixtral": {"hidden_size": 32, "intermediate_size": 64, "head_dim": 16},
}


@pytest.fixture(scope="module")
def narrow(ckpt, tmp_path_factory):
    """Checkpoints whose vision layers are 32 wide (tokenizer and processor copied from ``ckpt``)."""
    from transformers import AutoConfig

    out = {}
    for arch in tiny.ARCHS:
        d = tmp_path_factory.mktemp(f"narrow_{arch}")
        for f in ckpt[arch].iterdir():
            if f.name not in ("config.json", "model.safetensors", "jomed_manifest.json"):  # these change
                shutil.copy(f, d / f.name)
        cfg = AutoConfig.from_pretrained(ckpt[arch], local_files_only=True)
        for k, v in _NARROW_VISION[arch].items():
            setattr(cfg.vision_config, k, v)
        torch.manual_seed(0)
        tiny.model_class(arch)(cfg).save_pretrained(d, safe_serialization=True)
        out[arch] = d
    return out


# ---------------------------------------------------------------------------------- which layers
@pytest.mark.parametrize("size", tiny.SIZES)
@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_every_linear_layer_of_the_built_readers_fits_the_packed_kernel(arch, size):
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = tiny.model_class(arch)(tiny.make_config(arch, size))
    widths = _linear_widths(model)
    assert len(widths) > 20
    assert {n: w for n, w in widths.items() if w[0] % 64 or w[1] % 32} == {}


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_layers_the_kernel_cannot_take_stay_in_the_compute_dtype_and_are_named(ckpt, narrow, arch):
    from transformers import AutoConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny.model_class(arch)(AutoConfig.from_pretrained(narrow[arch], local_files_only=True))
    misfits = sorted(n for n, (i, o) in _linear_widths(model).items() if i % 64 or o % 32)
    assert misfits and all(("visual" in n or "vision_tower" in n or "projector" in n) for n in misfits)

    with pytest.warns(UserWarning, match=rf"{len(misfits)} linear layers .* stay in torch.float32") as record:
        reader = load_reader(narrow[arch], quantization="nf4", device="cpu")
    message = next(str(w.message) for w in record if "stay in" in str(w.message))
    assert all(name in message for name in misfits)
    assert sorted(reader.unquantized_layers) == misfits
    modules = dict(reader.hf_model.named_modules())
    assert all(type(modules[n]) is torch.nn.Linear and modules[n].weight.dtype == torch.float32 for n in misfits)
    quantized = set(_nf4_names(reader.hf_model))
    assert quantized and not quantized & set(misfits)
    assert quantized | set(misfits) | {"lm_head"} == set(_linear_widths(model))

    kernels = ["dequantize"] + (["packed"] if HAS_PACKED else [])
    outs = {}
    for kernel in kernels:  # the packed kernel crashed on these layers at the first forward
        r = (
            reader
            if kernel == "dequantize"
            else load_reader(narrow[arch], quantization="nf4", device="cpu", cpu_kernel=kernel)
        )
        with torch.no_grad():
            outs[kernel] = r.hidden_states(r.encode([_image()], QUESTION))
        assert torch.isfinite(outs[kernel]).all()
    if HAS_PACKED:
        assert (outs["packed"] - outs["dequantize"]).abs().max() < 0.05 * outs["dequantize"].abs().max()

    # the fingerprint covers what was kept out of the quantization
    other = dataclasses.replace(reader, unquantized_layers=tuple(misfits[1:]))
    assert reader_fingerprint(other) != reader_fingerprint(reader)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_quantize_vision_false_keeps_vision_tower_and_projector_unquantized(ckpt, arch, quant):
    import bitsandbytes as bnb

    def quantized(reader):
        return [
            n for n, m in reader.hf_model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
        ]

    vision = ("visual",) if arch == "qwen2_vl" else ("vision_tower", "multi_modal_projector")
    everywhere = quantized(load_reader(ckpt[arch], quantization=quant, device="cpu"))
    text_only = quantized(load_reader(ckpt[arch], quantization=quant, device="cpu", quantize_vision=False))
    in_vision = [n for n in everywhere if any(f".{v}." in f".{n}." for v in vision)]
    assert in_vision and text_only
    assert sorted(text_only) == sorted(set(everywhere) - set(in_vision))


# ---------------------------------------------------------------------------------- the CPU kernel
def _dequantized_copy(reader):
    """``reader``'s model with every NF4 layer replaced by an ``nn.Linear`` holding its dequantized weight."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    model = reader.model
    for name, layer in list(model.named_modules()):
        if isinstance(layer, bnb.nn.Linear4bit):
            assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
            dense = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            with torch.no_grad():
                dense.weight.copy_(F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float())
                if layer.bias is not None:
                    dense.bias.copy_(layer.bias)
            dense.requires_grad_(False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, dense)
    return reader


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_nf4_lora_gradients_after_an_eval_pass_equal_the_dequantized_model(ckpt, arch, tmp_path):
    reader = load_reader(ckpt[arch], quantization="nf4", lora=True, device="cpu")
    assert reader.cpu_kernel == "dequantize"
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in reader.lora_parameters().values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    adapter = reader.save_adapter(tmp_path / "adapter")
    enc = reader.encode([_image(1)], QUESTION, answer="benign")

    reader.eval()
    with torch.no_grad():  # where bitsandbytes repacks for its AVX512-BF16 kernel, if it is let
        evaluated = reader.logits(enc)
    assert quantization.packed_layers(reader.hf_model) == []
    reader.train()
    reader.model.zero_grad()
    reader(**enc).loss.backward()
    got = {n: p.grad.clone() for n, p in reader.lora_parameters().items()}

    ref = _dequantized_copy(
        load_reader(ckpt[arch], quantization="nf4", lora=adapter, lora_trainable=True, device="cpu")
    ).train()
    assert _nf4_names(ref.hf_model) == []
    ref.model.zero_grad()
    ref(**enc).loss.backward()
    want = {n: p.grad for n, p in ref.lora_parameters().items()}
    assert got.keys() == want.keys() and len(got) == 14 * reader.num_layers
    for n in got:  # the first layer's adapters only get a gradient through every layer above them
        torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-4, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(ref.eval().logits(enc), evaluated, atol=1e-4, rtol=0)


@pytest.mark.skipif(not HAS_PACKED, reason="this CPU has no AVX512-BF16: bitsandbytes' packed NF4 kernel does not run")
@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_packed_kernel_runs_on_request_frozen_and_refuses_gradients(ckpt, arch):
    reader = load_reader(ckpt[arch], quantization="nf4", device="cpu", cpu_kernel="packed")
    assert reader.cpu_kernel == "packed" and not reader.trainable_parameters()
    plain = load_reader(ckpt[arch], quantization="nf4", device="cpu")
    assert reader_fingerprint(reader) != reader_fingerprint(plain)  # bf16 kernel: other scores
    enc = reader.encode([_image(2)], QUESTION)
    with torch.no_grad():
        packed, ref = reader.logits(enc), plain.logits(enc)
    assert quantization.packed_layers(reader.hf_model) == _nf4_names(reader.hf_model) != []
    assert 0 < (packed - ref).abs().max() < 0.05 * ref.abs().max()

    pixels = enc["pixel_values"].clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="packed NF4 CPU kernel, which has no backward"):
        reader.logits({**enc, "pixel_values": pixels})
    with pytest.raises(ValueError, match="already run the packed CPU kernel"):
        reader.add_lora()
    with pytest.raises(ValueError, match="'packed' has no backward and the reader has a trainable adapter"):
        load_reader(ckpt[arch], quantization="nf4", lora=True, device="cpu", cpu_kernel="packed")

    fresh = load_reader(ckpt[arch], quantization="nf4", device="cpu", cpu_kernel="packed")
    fresh.add_lora()  # nothing repacked yet: it switches to the kernel with a backward
    assert fresh.cpu_kernel == "dequantize" and fresh.trainable_parameters()
    with torch.no_grad():
        fresh.logits(enc)
    assert quantization.packed_layers(fresh.hf_model) == []


@pytest.mark.skipif(HAS_PACKED, reason="this CPU has AVX512-BF16: the packed kernel runs here (see the test above)")
def test_packed_kernel_is_refused_on_a_cpu_without_avx512_bf16(ckpt):
    with pytest.raises(ValueError, match="cpu_kernel: 'packed' needs a CPU with AVX512-BF16"):
        load_reader(ckpt["qwen2_vl"], quantization="nf4", device="cpu", cpu_kernel="packed")


def test_cpu_kernel_errors_name_the_argument(ckpt):
    with pytest.raises(ValueError, match=r"cpu_kernel: expected one of \('dequantize', 'packed'\), got 'fast'"):
        load_reader(ckpt["qwen2_vl"], quantization="nf4", device="cpu", cpu_kernel="fast")
    with pytest.raises(ValueError, match="cpu_kernel: 'packed' applies to an NF4 reader on the CPU"):
        load_reader(ckpt["qwen2_vl"], quantization="int8", device="cpu", cpu_kernel="packed")
    reader = load_reader(ckpt["qwen2_vl"], quantization=None, device="cpu")
    assert reader.cpu_kernel is None and reader.unquantized_layers == ()
