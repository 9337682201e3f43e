"""Bytes of the reader's weights as bitsandbytes stores them.

NF4 (``bnb_4bit_use_double_quant=True``), per quantized ``nn.Linear`` of ``n = d_in · d_out`` weights:

======================  ==========================================  ===========================
tensor                  bytes                                       note
======================  ==========================================  ===========================
packed weight (uint8)   ceil(n / 2)                                 two 4-bit codes per byte
absmax (uint8)          ceil(n / 64)                                one per block of 64
absmax2 (fp32)          4 · ceil(ceil(n / 64) / 256)                second level, blocks of 256
code2 (fp32)            4 · 256                                     the 8-bit dynamic map
code (fp32)             4 · 16                                      the NF4 map
offset (fp32)           4                                           mean of absmax
bias                    e · d_out                                   compute dtype, not quantized
======================  ==========================================  ===========================

int8 (LLM.int8): ``n`` int8 bytes + fp32 row scales (4 · d_out) + bias. ``none``: e · n.
Kept in the compute dtype (element size e: 2 for bf16 on CUDA, 4 for fp32 on CPU): ``lm_head``
(``llm_int8_skip_modules``), the token embeddings, every norm, convolutions (patch embeddings) and
biases. The vision tower and projector are quantized like the language model (``load_reader``
default ``quantize_vision=True``); pass ``quantize_vision=False`` to keep them in e bytes.
"""

from __future__ import annotations

from collections import OrderedDict

from .arch import Arch, Linear

QUANTIZATIONS = ("nf4", "int8", "none")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def nf4_linear_bytes(n: int) -> dict[str, int]:
    blocks = _cdiv(n, 64)
    return {
        "nf4 packed": _cdiv(n, 2),
        "nf4 absmax (uint8)": blocks,
        "nf4 absmax2 + maps (fp32)": 4 * _cdiv(blocks, 256) + 4 * 256 + 4 * 16 + 4,
    }


def weight_bytes(
    arch: Arch, quantization: str = "nf4", elem: int = 2, quantize_vision: bool = True
) -> "OrderedDict[str, int]":
    """Weight bytes by storage kind (ordered dict; values in bytes)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization: expected one of {QUANTIZATIONS}, got {quantization!r}")
    out: OrderedDict[str, int] = OrderedDict()

    def add(k, v):
        out[k] = out.get(k, 0) + v

    for lin in arch.linears:
        quantized = quantization != "none" and lin.part != "lm_head" and (quantize_vision or lin.part != "vision")
        if lin.bias:
            add("biases (16-bit)", elem * lin.d_out)
        if lin.part == "lm_head":
            add("lm_head (16-bit)", elem * lin.numel)
        elif not quantized:
            add(f"{lin.part} linears (16-bit)", elem * lin.numel)
        elif quantization == "nf4":
            for k, v in nf4_linear_bytes(lin.numel).items():
                add(k, v)
        else:
            add("int8 weights", lin.numel)
            add("int8 row scales (fp32)", 4 * lin.d_out)
    emb = arch.dense.get("embed_tokens", 0)
    add("embed_tokens (16-bit)", elem * emb)
    add("norms + convs (16-bit)", elem * (sum(arch.dense.values()) - emb))
    return out


def lora_params(arch: Arch, rank: int) -> int:
    """Trainable LoRA parameters: A [r, d_in] + B [d_out, r] on every linear of the language model."""
    return sum(rank * (lin.d_in + lin.d_out) for lin in arch.text_linears) if rank else 0


def largest_linear(arch: Arch) -> Linear:
    return max((lin for lin in arch.linears if lin.part != "lm_head"), key=lambda lin: lin.numel)


def measured_module_bytes(module) -> int:
    """Bytes a loaded (possibly bitsandbytes-quantized) module holds: parameters, buffers and the
    tensors of every ``quant_state`` (absmax, nested absmax, code maps, offset), each storage once."""
    import torch

    seen: set = set()
    total = 0

    def count(t):
        nonlocal total
        if not isinstance(t, torch.Tensor):
            return
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen:
            return
        seen.add(key)
        total += t.untyped_storage().nbytes()

    for _, t in list(module.named_parameters()) + list(module.named_buffers()):
        count(t)
        qs = getattr(t, "quant_state", None)
        if qs is not None:
            for attr in ("absmax", "code", "offset"):
                count(getattr(qs, attr, None))
            s2 = getattr(qs, "state2", None)
            if s2 is not None:
                count(s2.absmax)
                count(s2.code)
        count(getattr(t, "SCB", None))
    return total
