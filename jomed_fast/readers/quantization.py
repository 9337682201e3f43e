"""Which of a reader's linear layers bitsandbytes quantizes, and which CPU kernel runs them.

Layers kept in the compute dtype (never quantized):

* ``lm_head`` (the class head reads its rows);
* the vision tower and the projector when ``quantize_vision=False``;
* every linear layer whose shape bitsandbytes' kernels cannot take (``LAYOUT_RULES``). NF4's
  packed CPU kernel (bitsandbytes >= 0.49 on CPUs with AVX512-BF16) regroups the weight into
  tiles of 32 output rows and the scales into blocks of 64 inputs, and fails on other widths
  (``RuntimeError: shape '[32, 0]' is invalid``) at the first forward. The rule is applied on
  every device and every CPU, so one checkpoint loads as one model everywhere; Qwen2-VL-7B
  (3584 / 18944 / 1280 wide) and Pixtral-12B (5120 / 14336 / 1024) conform in every layer.

The skipped layers are named exactly (a module-name regex anchored at both ends): transformers
matches ``llm_int8_skip_modules`` from the start of the full name or as a suffix, so a bare
prefix such as ``"visual"`` matches nothing and would quantize the vision tower silently.

CPU kernels of an NF4 reader (``cpu_kernel``):

==============  =================================================================================
``dequantize``  the default, on every CPU: a block is dequantized to the compute dtype and
                multiplied there. It has a backward (LoRA training runs on it), and a candidate's
                scores do not depend on what else is in its batch beyond fp32 rounding (1e-4).
``packed``      bitsandbytes' AVX512-BF16 kernel, for CPU inference. Each layer's weight is
                repacked in place at its first no-grad eval forward and the matmul runs in bf16,
                so scores move by up to ~1e-2 in log-probability with the batch around them. It
                has no backward: a layer once repacked drops the gradient with respect to its
                input in every later forward (bitsandbytes 0.50), so a packed reader is frozen and
                refuses any forward that needs a gradient.
==============  =================================================================================

bitsandbytes itself repacks on its own at the first no-grad forward wherever the CPU has
AVX512-BF16; ``set_cpu_kernel`` makes the choice explicit, so the kernel is the same on every CPU.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch

__all__ = [
    "CPU_KERNELS",
    "LAYOUT_RULES",
    "LayoutRule",
    "cpu_has_packed_kernel",
    "packed_layers",
    "quantization_config",
    "resolve_cpu_kernel",
    "set_cpu_kernel",
    "unquantizable_layers",
]

CPU_KERNELS = ("dequantize", "packed")


@dataclass(frozen=True)
class LayoutRule:
    """The widths a quantized ``nn.Linear`` must have: ``in_features % in_multiple == 0`` and
    ``out_features % out_multiple == 0``."""

    in_multiple: int
    out_multiple: int
    why: str

    def takes(self, linear: torch.nn.Linear) -> bool:
        return linear.in_features % self.in_multiple == 0 and linear.out_features % self.out_multiple == 0


LAYOUT_RULES: dict[str, LayoutRule] = {
    "nf4": LayoutRule(64, 32, "bitsandbytes' packed NF4 CPU kernel: inputs in blocks of 64, outputs in tiles of 32"),
    "int8": LayoutRule(1, 1, "LLM.int8() takes every shape"),
}


def _linear_layers(cls: type, config) -> dict[str, torch.nn.Linear]:
    """Every ``nn.Linear`` of ``cls(config)`` by full module name, built on the meta device (no memory)."""
    from accelerate import init_empty_weights

    with init_empty_weights(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(config)
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def unquantizable_layers(
    cls: type, config, quantization: str, keep_prefixes: tuple[str, ...] = ()
) -> tuple[list[str], list[str]]:
    """``(kept, misfits)``: the full names of the linear layers of ``cls(config)`` to keep in the
    compute dtype — ``lm_head``, those under ``keep_prefixes`` and the misfits of
    ``LAYOUT_RULES[quantization]`` — and, of them, the misfits alone."""
    rule = LAYOUT_RULES[quantization]
    kept, misfits = [], []
    for name, linear in _linear_layers(cls, config).items():
        under = (
            name == "lm_head"
            or name.endswith(".lm_head")
            or any(f".{name}.".find(f".{p}.") >= 0 for p in keep_prefixes)
        )
        if not rule.takes(linear):
            misfits.append(name)
            kept.append(name)
        elif under:
            kept.append(name)
    return kept, misfits


def quantization_config(quantization: str, compute_dtype: torch.dtype, kept: list[str]):
    """The ``BitsAndBytesConfig`` (the Hugging Face defaults, as LLaMA-Factory's QLoRA) that keeps
    exactly the layers ``kept`` in the compute dtype."""
    from transformers import BitsAndBytesConfig

    skip = [rf"{re.escape(name)}$" for name in kept]
    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=skip,
        )
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast from")
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


# ------------------------------------------------------------------------------------------
# CPU kernels of NF4 layers.
# ------------------------------------------------------------------------------------------
def cpu_has_packed_kernel() -> bool:
    """Whether bitsandbytes runs its packed NF4 kernel on this CPU (it needs AVX512-BF16)."""
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def resolve_cpu_kernel(cpu_kernel: str, quantization: str | None, device: torch.device, trainable: bool) -> str | None:
    """The CPU kernel an NF4 reader on ``device`` runs (``None`` when the choice does not apply)."""
    if cpu_kernel not in CPU_KERNELS:
        raise ValueError(f"cpu_kernel: expected one of {CPU_KERNELS}, got {cpu_kernel!r}")
    if quantization != "nf4" or device.type != "cpu":
        if cpu_kernel == "packed":
            raise ValueError(
                f"cpu_kernel: 'packed' applies to an NF4 reader on the CPU, got "
                f"quantization={quantization!r} on {device}"
            )
        return None
    if cpu_kernel == "packed":
        if not cpu_has_packed_kernel():
            raise ValueError(
                "cpu_kernel: 'packed' needs a CPU with AVX512-BF16 (bitsandbytes' packed NF4 "
                "kernel); this one has none: use 'dequantize'"
            )
        if trainable:
            raise ValueError(
                "cpu_kernel: 'packed' has no backward and the reader has a trainable adapter; use 'dequantize'"
            )
    return cpu_kernel


def _nf4_layers(model: torch.nn.Module):
    from bitsandbytes.nn import Linear4bit

    return [(name, m) for name, m in model.named_modules() if isinstance(m, Linear4bit)]


def _is_packed(layer) -> bool:
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


def packed_layers(model: torch.nn.Module) -> list[str]:
    """The NF4 layers of ``model`` whose weights bitsandbytes has repacked for its AVX512-BF16 kernel."""
    return [name for name, layer in _nf4_layers(model) if _is_packed(layer)]


_HOOK_ATTR = "_jomed_packed_guard"


def _refuse_gradient(layer, args):
    """Forward pre-hook of a packed layer: its kernel has no backward, so a forward that needs a
    gradient through the layer would silently get none."""
    if not (torch.is_grad_enabled() and _is_packed(layer)):
        return
    x = args[0] if args else None
    if (isinstance(x, torch.Tensor) and x.requires_grad) or any(p.requires_grad for p in layer.parameters()):
        raise RuntimeError(
            f"reader: layer {getattr(layer, '_jomed_name', '?')!r} runs bitsandbytes' packed NF4 CPU kernel, which "
            "has no backward; load the reader with cpu_kernel='dequantize' (or a trainable adapter) to take "
            "gradients through it"
        )


def set_cpu_kernel(model: torch.nn.Module, kernel: str) -> None:
    """Make every NF4 layer of ``model`` run ``kernel`` (``"packed"`` or ``"dequantize"``) on the CPU.

    Switching to ``dequantize`` is refused once a layer has been repacked: bitsandbytes' inverse
    re-quantizes the scales, so the weights would not be the ones that were loaded.
    """
    if kernel not in ("packed", "dequantize"):
        raise ValueError(f"kernel: expected 'packed' or 'dequantize', got {kernel!r}")
    layers = _nf4_layers(model)
    if kernel == "dequantize":
        repacked = [name for name, layer in layers if _is_packed(layer)]
        if repacked:
            raise ValueError(
                f"reader: {len(repacked)} NF4 layers (first {repacked[0]!r}) already run the packed CPU kernel, "
                "which has no backward; load the reader with cpu_kernel='dequantize' (or with the adapter "
                "trainable) to train it"
            )
    for name, layer in layers:
        if not hasattr(layer, "support_avx512bf16_for_cpu"):  # a bitsandbytes with no packed kernel
            if kernel == "packed":
                raise RuntimeError(
                    "bitsandbytes: this version has no packed NF4 CPU kernel "
                    "(Linear4bit.support_avx512bf16_for_cpu); install one in the tested range"
                )
            continue
        layer.support_avx512bf16_for_cpu = kernel == "packed" and cpu_has_packed_kernel()
        handle = getattr(layer, _HOOK_ATTR, None)
        if kernel == "packed" and handle is None:
            layer._jomed_name = name
            setattr(layer, _HOOK_ATTR, layer.register_forward_pre_hook(_refuse_gradient))
        elif kernel == "dequantize" and handle is not None:
            handle.remove()
            delattr(layer, _HOOK_ATTR)
