"""Offline reader checkpoints built in code: ``tiny`` for tests, ``small`` for benchmarks.

``build(arch, out_dir, size)`` writes a complete checkpoint directory that the *unmodified* Hugging
Face classes load with ``from_pretrained(out_dir, local_files_only=True)``:

=========================  =====================================================================
file                       content
=========================  =====================================================================
``config.json``            ``Qwen2VLConfig`` or ``LlavaConfig`` (Pixtral vision + Mistral text)
``model.safetensors``      seeded random weights (``torch.manual_seed(seed)`` + HF init)
``generation_config.json`` written by ``save_pretrained``
``tokenizer.json``         byte-level BPE trained in code with the ``tokenizers`` library
``tokenizer_config.json``  special tokens and the family's chat template
``preprocessor_config.json`` the image processor (PIL backend, no torchvision)
``jomed_build.json``       what was built (arch, size, seed, dtype): rebuilding is skipped when equal
=========================  =====================================================================

Architectures (``arch``): ``"qwen2_vl"`` (``Qwen2VLForConditionalGeneration``, M-RoPE) and
``"pixtral"`` (``LlavaForConditionalGeneration`` with a ``PixtralVisionConfig`` vision tower and a
Mistral text model), the paper's two (``ARCHS``); and, ``tiny`` only (``EXTRA_ARCHS``),
``"qwen2_5_vl"`` (``Qwen2_5_VLForConditionalGeneration``: gated-MLP RMSNorm vision tower with
window attention, the Qwen2-VL tokenizer and image processor) and ``"llava"``
(``LlavaForConditionalGeneration`` with a CLIP vision tower and a Llama text model, read through
its own ``LlavaProcessor``: the generic family), whose directory also holds ``processor_config.json``.

Sizes: ``tiny`` runs a forward in milliseconds (2 text layers, hidden 64, 2 vision layers of width
64, a ~1k vocabulary, 28-64 px images). Every linear layer of both sizes is a multiple of 64 wide
on its input and of 32 on its output, so NF4 runs on the same CPU kernel as for the real readers
(``readers.quantization.LAYOUT_RULES``). ``small`` keeps what decides the speed of the real readers
(Qwen2-VL-7B, Pixtral-12B) and shrinks the rest; see ``PRESERVED``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from jomed_fast._files import replace_dir_atomically

ARCHS = ("qwen2_vl", "pixtral")
EXTRA_ARCHS = ("qwen2_5_vl", "llava")  # tiny only
ALL_ARCHS = ARCHS + EXTRA_ARCHS
SIZES = ("tiny", "small")
_QWEN = ("qwen2_vl", "qwen2_5_vl")  # one tokenizer, one image processor

BUILD_STAMP = "jomed_build.json"
BUILD_VERSION = 2

# --------------------------------------------------------------------------------------------
# What ``small`` keeps from the real models (and what it shrinks). Read by the README.
# --------------------------------------------------------------------------------------------
PRESERVED: dict[str, dict[str, Any]] = {
    "qwen2_vl": {
        "reference": "Qwen2-VL-7B-Instruct",
        "kept": {
            "vocab_size": 151_936,  # Qwen2-VL-2B's embedding size (7B pads to 152,064)
            "head_dim": 128,
            "gqa_ratio": "28 heads / 4 KV heads = 7",
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "mrope_section": [16, 24, 24],
            "image_processor": "min_pixels 3136, max_pixels 12,845,056 (tokens per image as the real one)",
            "untied lm_head": True,
            "vision_head_dim": 80,
        },
        "shrunk": {
            "num_hidden_layers": "28 -> 4",
            "attention heads": "28/4 -> 7/1 (hidden 3584 -> 896 = 7 x 128)",
            "intermediate_size": "18944 -> 4736 (same ratio to hidden)",
            "vision depth / width": "32 x 1280 (16 heads) -> 2 x 320 (4 heads)",
            "tokenizer": "a byte-level BPE of ~1.7k tokens (the real pre-tokenizer split); the embedding and lm_head keep all rows",
        },
    },
    "pixtral": {
        "reference": "Pixtral-12B (mistral-community/pixtral-12b, LlavaForConditionalGeneration)",
        "kept": {
            "vocab_size": 131_072,
            "head_dim": 128,
            "gqa_ratio": "32 heads / 8 KV heads = 4",
            "hidden / (heads * head_dim)": "5120 / 4096 = 1.25",
            "patch_size": 16,
            "spatial_merge_size": "1 ([IMG] rows closed by [IMG_BREAK], last one by [IMG_END])",
            "image_processor": "longest_edge 1024 (tokens per image as the real one)",
            "special token ids": "[INST]=3, [/INST]=4, [IMG]=10, [IMG_BREAK]=12, [IMG_END]=13",
            "vision_head_dim": 64,
            "untied lm_head": True,
        },
        "shrunk": {
            "num_hidden_layers": "40 -> 4",
            "attention heads": "32/8 -> 8/2 (hidden 5120 -> 1280)",
            "intermediate_size": "14336 -> 3584 (same ratio to hidden)",
            "vision depth / width": "24 x 1024 (16 heads) -> 2 x 256 (4 heads)",
            "tokenizer": "a byte-level BPE of ~1.7k tokens (the real pre-tokenizer split); the embedding and lm_head keep all rows",
        },
    },
}


def preserved_table() -> str:
    """``PRESERVED`` as a Markdown table (for the README)."""
    lines = ["| family | kept from the real model | shrunk |", "|---|---|---|"]
    for arch, info in PRESERVED.items():
        kept = "; ".join(f"{k}: {v}" for k, v in info["kept"].items())
        shrunk = "; ".join(f"{k}: {v}" for k, v in info["shrunk"].items())
        lines.append(f"| {arch} ({info['reference']}) | {kept} | {shrunk} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Special tokens of each family.
# --------------------------------------------------------------------------------------------
QWEN2_VL_SPECIAL_TOKENS = (  # appended after the BPE vocabulary, in Qwen2's order
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

PIXTRAL_SPECIAL_TOKENS = (  # ids 0..19 as in Pixtral's Tekken vocabulary
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[TOOL_CALLS]",
    "[IMG]",
    "<pad>",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[PREFIX]",
    "[MIDDLE]",
    "[SUFFIX]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
)

# Qwen2-VL-Instruct's chat template (images and videos as content parts).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

LLAVA_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<image>", "<pad>")

# A LLaVA-1.5-style template ("USER: ... ASSISTANT:") with the images where the content puts them.
LLAVA_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}{{- message['role'].upper() + ': ' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for chunk in message['content'] %}"
    "{%- if chunk['type'] == 'image' %}{{- '<image>' }}{%- elif chunk['type'] == 'text' %}{{- chunk['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}{{- eos_token }}{%- endif %}{{- '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'ASSISTANT:' }}{%- endif %}"
)

# Pixtral-12B's chat template (mistral-community/pixtral-12b), assistant content may be parts.
PIXTRAL_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if messages[0]['content'] is string %}{%- set system_message = messages[0]['content'] %}"
    "{%- else %}{%- set system_message = messages[0]['content'][0]['text'] %}{%- endif %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}{{- '[INST]' + system_message + '\\n\\n' }}"
    "{%- else %}{{- '[INST]' }}{%- endif %}"
    "{%- if message['content'] is not string %}"
    "{%- for chunk in message['content'] %}"
    "{%- if chunk['type'] == 'text' %}{{- chunk['text'] }}"
    "{%- elif chunk['type'] == 'image' %}{{- '[IMG]' }}"
    "{%- else %}{{- raise_exception('Unrecognized content type!') }}{%- endif %}"
    "{%- endfor %}"
    "{%- else %}{{- message['content'] }}{%- endif %}"
    "{{- '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- if message['content'] is not string %}"
    "{%- for chunk in message['content'] %}{{- chunk['text'] }}{%- endfor %}"
    "{%- else %}{{- message['content'] }}{%- endif %}"
    "{{- eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the "
    "exception of an initial optional system message!') }}"
    "{%- endif %}"
    "{%- endfor %}"
)

# --------------------------------------------------------------------------------------------
# Model dimensions.
# --------------------------------------------------------------------------------------------
_DIMS: dict[tuple[str, str], dict[str, Any]] = {
    ("qwen2_vl", "tiny"): dict(
        layers=2,
        heads=4,
        kv_heads=2,
        hidden=64,
        intermediate=128,
        mrope_section=[2, 3, 3],
        v_depth=2,
        v_embed=64,
        v_heads=2,
        bpe_vocab=768,
        min_pixels=28 * 28,
        max_pixels=56 * 56,
        init=0.1,
    ),
    ("qwen2_vl", "small"): dict(
        layers=4,
        heads=7,
        kv_heads=1,
        hidden=896,
        intermediate=4736,
        mrope_section=[16, 24, 24],
        v_depth=2,
        v_embed=320,
        v_heads=4,
        bpe_vocab=4096,
        vocab=151_936,
        min_pixels=56 * 56,
        max_pixels=28 * 28 * 16384,
        init=0.02,
    ),
    ("qwen2_5_vl", "tiny"): dict(
        layers=2,
        heads=4,
        kv_heads=2,
        hidden=64,
        intermediate=128,
        mrope_section=[2, 3, 3],
        v_depth=2,
        v_hidden=64,
        v_intermediate=128,
        v_heads=2,
        window_size=28,  # one merged token per window: block 0 attends within windows, block 1 fully
        fullatt_block_indexes=[1],
        tokens_per_second=2,
        bpe_vocab=768,
        min_pixels=28 * 28,
        max_pixels=56 * 56,
        init=0.1,
    ),
    ("llava", "tiny"): dict(
        layers=2,
        heads=4,
        kv_heads=2,
        head_dim=16,
        hidden=64,
        intermediate=128,
        v_layers=2,
        v_hidden=64,
        v_heads=2,
        v_intermediate=128,
        image_size=32,
        v_patch=8,
        bpe_vocab=768,
        init=0.1,
    ),
    ("pixtral", "tiny"): dict(
        layers=2,
        heads=4,
        kv_heads=2,
        head_dim=16,
        hidden=64,
        intermediate=128,
        v_layers=2,
        v_hidden=64,
        v_heads=2,
        v_intermediate=128,
        longest_edge=64,
        bpe_vocab=768,
        init=0.1,
    ),
    ("pixtral", "small"): dict(
        layers=4,
        heads=8,
        kv_heads=2,
        head_dim=128,
        hidden=1280,
        intermediate=3584,
        v_layers=2,
        v_hidden=256,
        v_heads=4,
        v_intermediate=1024,
        longest_edge=1024,
        bpe_vocab=4096,
        vocab=131_072,
        init=0.02,
    ),
}


def _check(arch: str, size: str) -> None:
    if arch not in ALL_ARCHS:
        raise ValueError(f"arch: expected one of {ALL_ARCHS}, got {arch!r}")
    if size not in SIZES:
        raise ValueError(f"size: expected one of {SIZES}, got {size!r}")
    if (arch, size) not in _DIMS:
        raise ValueError(f"size: {arch!r} is built at {[z for a, z in _DIMS if a == arch]} only, got {size!r}")


# --------------------------------------------------------------------------------------------
# Tokenizer.
# --------------------------------------------------------------------------------------------
_WORDS = (
    "the a an of to in on at for with and or not no yes is are was were be been this that these "
    "those what which who where when how why does do did can could should would will may might "
    "image picture photo scan view slide question answer background caption report finding "
    "findings patient case lesion tumor tumour cell cells tissue skin chest lung lungs heart "
    "brain bone liver kidney breast eye retina fundus xray x-ray ct mri ultrasound histology "
    "pathology dermoscopy radiograph benign malignant normal abnormal mild moderate severe "
    "grade stage class label diagnosis disease infection fracture nodule mass effusion edema "
    "pneumonia melanoma nevus carcinoma adenoma cyst polyp lesions left right upper lower "
    "anterior posterior lateral medial small large round irregular border margin color colour "
    "dark light red blue white black shows show showing seen visible present absent there "
    "here it its they their we you he she his her from by as if then than also more most less "
    "very about into over under between after before during within without other same different "
    "one two three four five six seven eight nine ten zero first second third level score "
    "option options choose choice correct best following based given according most likely "
    "assistant user system helpful you are please describe explain provide the following"
).split()


def _corpus() -> list[str]:
    """A deterministic English + digits + punctuation corpus for the BPE trainer."""
    import random

    rng = random.Random(1234)
    lines = [" ".join(_WORDS), " ".join(w.capitalize() for w in _WORDS)]
    punct = list(".,;:!?()[]{}'\"-/%+=*<>#&@_")
    for _i in range(3000):
        n = rng.randint(4, 16)
        words = [rng.choice(_WORDS) for _ in range(n)]
        if rng.random() < 0.5:
            words[0] = words[0].capitalize()
        k = rng.random()
        if k < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 1000)))
        elif k < 0.5:
            words.insert(rng.randrange(len(words)), f"{rng.randint(0, 99)}.{rng.randint(0, 9)}")
        line = " ".join(words) + rng.choice([".", "?", "!", ":", ";", ","])
        if rng.random() < 0.2:
            line = f"({line})" if rng.random() < 0.5 else f"{rng.choice(punct)} {line}"
        if rng.random() < 0.25 and lines:
            line = lines[-1] + rng.choice(["\n", "\n\n"]) + line
        lines.append(line)
    lines.append("".join(punct) + " 0 1 2 3 4 5 6 7 8 9 10 100 2024")
    lines.append("A B C D E F G H I J K L M N O P Q R S T U V W X Y Z")
    return lines


# Pre-tokenizer splits of the real tokenizers: both put every digit in its own piece, so a number
# such as "10" is several tokens (which the multi-token class verbalizers must handle).
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEKKEN_SPLIT_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def build_tokenizer(arch: str, size: str = "tiny"):
    """A byte-level BPE fast tokenizer (any text encodes) with the family's special tokens.

    Qwen2-VL: BPE ids first, then ``<|endoftext|>`` ... ``<|video_pad|>`` (Qwen2's order).
    Pixtral: the 20 control tokens first (``[IMG]`` = 10, ``[IMG_BREAK]`` = 12, ``[IMG_END]`` = 13,
    as in Tekken), then the BPE ids. Returns a ``transformers`` fast tokenizer with the chat template.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    _check(arch, size)
    dims = _DIMS[arch, size]
    tok = Tokenizer(models.BPE())
    split = TEKKEN_SPLIT_REGEX if arch == "pixtral" else QWEN2_SPLIT_REGEX
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    front = list({"pixtral": PIXTRAL_SPECIAL_TOKENS, "llava": LLAVA_SPECIAL_TOKENS}.get(arch, ()))
    trainer = trainers.BpeTrainer(
        vocab_size=dims["bpe_vocab"] + len(front),
        min_frequency=1,
        show_progress=False,
        special_tokens=front,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if arch in _QWEN:
        from tokenizers import AddedToken

        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_VL_SPECIAL_TOKENS])
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            chat_template=QWEN2_VL_CHAT_TEMPLATE,
            model_max_length=32768,
            clean_up_tokenization_spaces=False,
            padding_side="right",
        )
    else:
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
            chat_template=PIXTRAL_CHAT_TEMPLATE if arch == "pixtral" else LLAVA_CHAT_TEMPLATE,
            model_max_length=1_024_000 if arch == "pixtral" else 4096,
            clean_up_tokenization_spaces=False,
            padding_side="right",
        )
        if arch == "llava":  # LlavaProcessor reads the token from the tokenizer's special tokens
            fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


# --------------------------------------------------------------------------------------------
# Configs and image processors.
# --------------------------------------------------------------------------------------------
def _decoder_dims(d: dict, vocab: int) -> dict:
    """Config fields of the SiLU, GQA decoder both families share."""
    return dict(
        vocab_size=vocab,
        hidden_size=d["hidden"],
        intermediate_size=d["intermediate"],
        num_hidden_layers=d["layers"],
        num_attention_heads=d["heads"],
        num_key_value_heads=d["kv_heads"],
        hidden_act="silu",
        initializer_range=d["init"],
    )


def make_config(arch: str, size: str = "tiny", tokenizer=None):
    """The model config of ``arch``/``size`` (no weights): cheap, used to test ``small``'s facts.

    ``tokenizer`` gives the special-token ids; built when omitted. For ``small`` the embedding
    is padded to the real vocabulary size; for ``tiny`` it is the tokenizer's size rounded up to 64.
    """
    _check(arch, size)
    d = _DIMS[arch, size]
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(arch, size)
    n_tok = len(tokenizer)
    vocab = d.get("vocab") or -(-n_tok // 64) * 64
    if vocab < n_tok:
        raise ValueError(f"vocab_size {vocab} is smaller than the tokenizer ({n_tok} tokens)")
    conv = tokenizer.convert_tokens_to_ids
    cfg = _CONFIGS[arch](d, vocab, conv)
    cfg.architectures = [model_class(arch).__name__]
    return cfg


def _qwen_text(d: dict, vocab: int, conv, model_type: str) -> dict:
    """The Qwen2 text config both Qwen families share (M-RoPE sections in its rope parameters)."""
    return dict(
        **_decoder_dims(d, vocab),
        model_type=model_type,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": d["mrope_section"]},
        bos_token_id=conv("<|endoftext|>"),
        eos_token_id=conv("<|im_end|>"),
        pad_token_id=conv("<|endoftext|>"),
        use_sliding_window=False,
        tie_word_embeddings=False,
    )


def _qwen2_vl_config(d: dict, vocab: int, conv):
    from transformers import Qwen2VLConfig

    text = _qwen_text(d, vocab, conv, "qwen2_vl_text")
    vision = dict(
        depth=d["v_depth"],
        embed_dim=d["v_embed"],
        hidden_size=d["hidden"],
        num_heads=d["v_heads"],
        mlp_ratio=4,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
        hidden_act="quick_gelu",
        initializer_range=d["init"],
    )
    cfg = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=conv("<|image_pad|>"),
        video_token_id=conv("<|video_pad|>"),
        vision_start_token_id=conv("<|vision_start|>"),
        vision_end_token_id=conv("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    cfg.vision_token_id = conv("<|vision_pad|>")
    return cfg


def _qwen2_5_vl_config(d: dict, vocab: int, conv):
    from transformers import Qwen2_5_VLConfig

    vision = dict(
        depth=d["v_depth"],
        hidden_size=d["v_hidden"],
        intermediate_size=d["v_intermediate"],
        num_heads=d["v_heads"],
        out_hidden_size=d["hidden"],
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        tokens_per_second=d["tokens_per_second"],
        window_size=d["window_size"],
        fullatt_block_indexes=d["fullatt_block_indexes"],
        in_channels=3,
        hidden_act="silu",
        initializer_range=d["init"],
    )
    return Qwen2_5_VLConfig(
        text_config=_qwen_text(d, vocab, conv, "qwen2_5_vl_text"),
        vision_config=vision,
        image_token_id=conv("<|image_pad|>"),
        video_token_id=conv("<|video_pad|>"),
        vision_start_token_id=conv("<|vision_start|>"),
        vision_end_token_id=conv("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def _pixtral_config(d: dict, vocab: int, conv):
    from transformers import LlavaConfig, MistralConfig, PixtralVisionConfig

    text = MistralConfig(
        **_decoder_dims(d, vocab),
        head_dim=d["head_dim"],
        max_position_embeddings=1_024_000,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000_000.0},
        sliding_window=None,
        bos_token_id=conv("<s>"),
        eos_token_id=conv("</s>"),
        pad_token_id=conv("<pad>"),
        tie_word_embeddings=False,
    )
    vision = PixtralVisionConfig(
        hidden_size=d["v_hidden"],
        intermediate_size=d["v_intermediate"],
        num_hidden_layers=d["v_layers"],
        num_attention_heads=d["v_heads"],
        num_channels=3,
        image_size=d["longest_edge"],
        patch_size=16,
        hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        initializer_range=d["init"],
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=conv("[IMG]"),
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        multimodal_projector_bias=True,
        image_seq_length=1,
        tie_word_embeddings=False,
    )
    return cfg


def _llava_config(d: dict, vocab: int, conv):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(
        **_decoder_dims(d, vocab),
        head_dim=d["head_dim"],
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=conv("<s>"),
        eos_token_id=conv("</s>"),
        pad_token_id=conv("<pad>"),
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=d["v_hidden"],
        intermediate_size=d["v_intermediate"],
        num_hidden_layers=d["v_layers"],
        num_attention_heads=d["v_heads"],
        image_size=d["image_size"],
        patch_size=d["v_patch"],
        projection_dim=d["v_hidden"],
        initializer_range=d["init"],
    )
    return LlavaConfig(  # LLaVA-1.5's choices: CLS dropped ("default"), a GELU projector with biases
        vision_config=vision,
        text_config=text,
        image_token_index=conv("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        multimodal_projector_bias=True,
        image_seq_length=(d["image_size"] // d["v_patch"]) ** 2,
        tie_word_embeddings=False,
    )


_CONFIGS = {
    "qwen2_vl": _qwen2_vl_config,
    "qwen2_5_vl": _qwen2_5_vl_config,
    "pixtral": _pixtral_config,
    "llava": _llava_config,
}


def make_image_processor(arch: str, size: str = "tiny"):
    """The PIL-backend image processor (no torchvision) with the checkpoint's settings."""
    _check(arch, size)
    d = _DIMS[arch, size]
    if arch in _QWEN:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        return Qwen2VLImageProcessorPil(
            min_pixels=d["min_pixels"], max_pixels=d["max_pixels"], patch_size=14, temporal_patch_size=2, merge_size=2
        )
    if arch == "llava":  # CLIP's: the shortest edge resized to the tower's input, then a centre crop
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        side = d["image_size"]
        return CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    from transformers.models.pixtral.image_processing_pil_pixtral import (
        PixtralImageProcessorPil,
    )

    return PixtralImageProcessorPil(size={"longest_edge": d["longest_edge"]}, patch_size={"height": 16, "width": 16})


def make_processor(arch: str, size: str = "tiny", tokenizer=None):
    """The Hugging Face processor a generic-family checkpoint ships (``llava``: ``LlavaProcessor``
    over the CLIP image processor), or None for the families whose placeholders the project expands."""
    _check(arch, size)
    if arch != "llava":
        return None
    from transformers import LlavaProcessor

    d = _DIMS[arch, size]
    return LlavaProcessor(
        image_processor=make_image_processor(arch, size),
        tokenizer=tokenizer if tokenizer is not None else build_tokenizer(arch, size),
        patch_size=d["v_patch"],
        vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE,
        num_additional_image_tokens=1,  # CLIP's CLS token, which "default" drops again
    )


_MODEL_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "pixtral": "LlavaForConditionalGeneration",
    "llava": "LlavaForConditionalGeneration",
}


def model_class(arch: str):
    """The unmodified Hugging Face class of ``arch``."""
    if arch not in _MODEL_CLASSES:
        raise ValueError(f"arch: expected one of {ALL_ARCHS}, got {arch!r}")
    import transformers

    return getattr(transformers, _MODEL_CLASSES[arch])


# --------------------------------------------------------------------------------------------
# Build.
# --------------------------------------------------------------------------------------------
def build(
    arch: str,
    out_dir: str | os.PathLike,
    size: str = "tiny",
    *,
    seed: int = 0,
    dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a complete, loadable checkpoint of ``arch`` at ``size`` to ``out_dir``; return its path.

    Weights are seeded random (``seed``) and stored as safetensors in ``dtype`` (``"float32"`` for
    ``tiny``, ``"bfloat16"`` for ``small`` unless given; the real checkpoints are bf16). The
    directory is written beside ``out_dir`` and renamed into place, so a reader never sees half a
    checkpoint. An ``out_dir`` that already holds the same build (``jomed_build.json``) is returned
    as is; one holding anything else is an error unless ``overwrite``.
    """
    import torch

    _check(arch, size)
    if not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    dtype = dtype or ("float32" if size == "tiny" else "bfloat16")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype: expected 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    out = Path(out_dir)
    stamp = {"version": BUILD_VERSION, "arch": arch, "size": size, "seed": seed, "dtype": dtype}
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"out_dir: expected a directory, got the file {str(out)!r}")
        if any(out.iterdir()):
            try:
                old = json.loads((out / BUILD_STAMP).read_text())
            except (OSError, ValueError):
                old = None
            if old == stamp:
                return out
            if not overwrite:
                raise ValueError(
                    f"out_dir: {str(out)!r} is not empty and holds no identical build "
                    f"(expected {stamp}, found {old}); pass overwrite=True to replace it"
                )
    out.parent.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(arch, size)
    config = make_config(arch, size, tokenizer)
    image_processor = make_image_processor(arch, size)
    hf_processor = make_processor(arch, size, tokenizer)
    cls = model_class(arch)

    torch_dtype = getattr(torch, dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model = model.to(torch_dtype).eval()
    config.dtype = dtype

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp, save_jinja_files=False)
        image_processor.save_pretrained(tmp)
        if hf_processor is not None:  # processor_config.json: what AutoProcessor builds the generic family from
            hf_processor.save_pretrained(tmp)
        (tmp / BUILD_STAMP).write_text(json.dumps(stamp, indent=2) + "\n")

    return replace_dir_atomically(out, fill)


__all__ = [
    "ARCHS",
    "EXTRA_ARCHS",
    "ALL_ARCHS",
    "SIZES",
    "PRESERVED",
    "BUILD_VERSION",
    "preserved_table",
    "build",
    "build_tokenizer",
    "make_config",
    "make_image_processor",
    "make_processor",
    "model_class",
]
