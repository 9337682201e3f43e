"""Readers: unmodified Hugging Face VLMs (Qwen2-VL, Qwen2.5-VL, Pixtral-LLaVA, and any other
``AutoModelForImageTextToText`` family the scorer can take exactly: ``families``) loaded from local
directories, optionally in NF4 / int8 with a LoRA adapter, plus offline tiny/small checkpoints built
in code.

    from jomed_fast.readers import tiny, load_reader
    path = tiny.build("qwen2_vl", "/tmp/qwen_tiny")            # or "pixtral"; size="small"
    reader = load_reader(path, quantization="nf4", lora=True)  # device defaults to CUDA if present
    inputs = reader.encode([image], [{"role": "user", "content": [{"type": "image"},
                                                                  {"type": "text", "text": "..."}]}])
    hidden = reader.hidden_states(inputs)                      # [B, L, H], no logits computed
    logits_c = hidden[:, -1] @ reader.lm_head_weight()[class_ids].T

No torchvision anywhere: images go through ``ReaderProcessor`` (PIL image processors).
``tiny`` is the module :mod:`.offline_checkpoints` (the checkpoints built in code); ``load_reader``
and ``Reader`` live in :mod:`.hf_reader`; each family's facts in :mod:`.families`, how its images
become placeholders and vision inputs in :mod:`.image_formats`.
"""

from . import offline_checkpoints as tiny
from .hf_reader import (
    QUANTIZATIONS,
    LoraSettings,
    Reader,
    check_checkpoint_dir,
    check_trained_layout,
    load_adapter,
    load_reader,
    lora_target_regex,
    save_adapter,
)
from .processor import IGNORE_INDEX, ReaderProcessor

__all__ = [
    "tiny",
    "load_reader",
    "Reader",
    "ReaderProcessor",
    "LoraSettings",
    "save_adapter",
    "load_adapter",
    "check_checkpoint_dir",
    "check_trained_layout",
    "lora_target_regex",
    "QUANTIZATIONS",
    "IGNORE_INDEX",
]
