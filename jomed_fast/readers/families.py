"""Reader families: the facts the loader, the processor and the scorer need about a kind of VLM,
read off its config in one place (``family_of(config)``) instead of branched on where they are used.

==============  ======================================  ===========================================
family          recognised by (config.json)             facts
==============  ======================================  ===========================================
qwen2_vl        model_type ``qwen2_vl``                 ``Qwen2VLForConditionalGeneration``; images
                                                        as patch rows (``image_formats.PatchRows``);
                                                        M-RoPE positions; vision under ``visual``
qwen2_5_vl      model_type ``qwen2_5_vl``               ``Qwen2_5_VLForConditionalGeneration``; as
                                                        qwen2_vl (same processor, same M-RoPE
                                                        numbering of images; see below)
pixtral         model_type ``llava``, pixtral vision    ``LlavaForConditionalGeneration``; ``[IMG]``
                                                        rows closed by ``[IMG_BREAK]`` / ``[IMG_END]``
                                                        (``image_formats.PixtralImages``); 1-D RoPE
any other       a model ``AutoModelForImageTextToText``  the class that mapping names; placeholders
                loads (e.g. ``llava`` with a CLIP tower) expanded by the checkpoint's own HF
                                                        processor (``image_formats.ProcessorImages``);
                                                        1-D RoPE; the vision tower and projector are
                                                        every part of ``model`` but ``language_model``
==============  ======================================  ===========================================

Every family's image features replace the tokens ``config.image_token_id`` in the decoder's input
embeddings (what each HF model's ``get_placeholder_mask`` does), produced by the model's own
``get_image_features``; the decoder is ``model.language_model``.

Qwen2.5-VL and Qwen2-VL number images alike (transformers 5.24, ``get_rope_index``): the temporal
axis of a vision span is scaled by ``tokens_per_second · second_per_grid_ts`` for *videos* only, and
an image's grid has t = 1 anyway (``temporal_patch_size`` copies of the one frame make one temporal
patch), so its positions are Qwen2-VL's: ``(s, s + row, s + col)``. Qwen2.5-VL's window attention
lives inside its vision tower, which sees each image alone either way.

Refused, with a one-line ``ValueError`` naming the family and the reason: families whose exactness
the shared-prefix scorer cannot keep (``REFUSED``: bidirectional attention over image tokens,
cross-attention to images, images tiled into sub-images with text between them), a generic family
with M-RoPE (its numbering is not known to the packer), and a model without an image token or
without ``model.language_model``.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

__all__ = ["Family", "KNOWN", "REFUSED", "family_of", "vision_dims"]


@dataclasses.dataclass(frozen=True)
class Family:
    """What one family's readers are, as ``family_of`` reads it off a config.

    Attributes:
        name: ``qwen2_vl``, ``qwen2_5_vl``, ``pixtral``, or the ``model_type`` of a generic reader.
        model_class: the unmodified Hugging Face class the weights load into.
        image_format: ``"patch_rows"``, ``"pixtral"`` or ``"processor"`` (``readers.image_formats``).
        mrope: positions are 3-D M-RoPE numbered from each image's patch grid (else 1-D RoPE).
        merge_size: patches merged into one image token along each axis (1: none).
        patch_size: the vision tower's patch, in pixels.
        image_token_id: the token the image features replace (``config.image_token_id``).
        vision_modules: the attributes of ``model.model`` holding the vision tower and projector.
        vision_dims: the tower's width, MLP width and heads (the scorer's memory budget reads them).
        end_of_turn_token: the token closing an answer; None: the tokenizer's eos.
    """

    name: str
    model_class: type
    image_format: str
    mrope: bool
    merge_size: int
    patch_size: int
    image_token_id: int
    vision_modules: tuple[str, ...]
    vision_dims: tuple[int, int, int]
    end_of_turn_token: str | None = None

    @property
    def generic(self) -> bool:
        """Whether the family is not in ``KNOWN`` (its placeholders come from its HF processor)."""
        return self.name not in KNOWN


# the families whose images, positions and tokens are spelled out (the rest are generic)
KNOWN: dict[str, dict[str, Any]] = {
    "qwen2_vl": dict(
        model_class="Qwen2VLForConditionalGeneration",
        image_format="patch_rows",
        mrope=True,
        vision_modules=("visual",),
        end_of_turn_token="<|im_end|>",
    ),
    "qwen2_5_vl": dict(
        model_class="Qwen2_5_VLForConditionalGeneration",
        image_format="patch_rows",
        mrope=True,
        vision_modules=("visual",),
        end_of_turn_token="<|im_end|>",
    ),
    "pixtral": dict(
        model_class="LlavaForConditionalGeneration",
        image_format="pixtral",
        mrope=False,
        vision_modules=("vision_tower", "multi_modal_projector"),
        end_of_turn_token="</s>",
    ),
}

# model_type -> why the shared-prefix scorer cannot score it exactly
REFUSED: dict[str, str] = {
    "gemma3": "its image tokens attend to each other bidirectionally, which the scorer's causal masks cannot express",
    "paligemma": "its prompt attends bidirectionally (a prefix-LM), which the scorer's causal masks cannot express",
    "mllama": "it reads images through cross-attention layers, not as tokens of the decoder's sequence",
    "llava_next": "its processor tiles each image (anyres) into crops plus the whole, in pixel_values [images, crops, ...]",
    "llava_onevision": "its processor tiles each image (anyres) into crops plus the whole, in pixel_values [images, crops, ...]",
    "idefics3": "its processor tiles each image into sub-images with row/column text between them, nested per prompt",
    "smolvlm": "its processor tiles each image into sub-images with row/column text between them, nested per prompt",
}


def _family_name(config) -> str:
    model_type = getattr(config, "model_type", None)
    if model_type == "llava":
        vision_type = getattr(getattr(config, "vision_config", None), "model_type", None)
        return "pixtral" if vision_type == "pixtral" else "llava"
    return str(model_type)


def vision_dims(config) -> tuple[int, int, int]:
    """``(width, MLP width, heads)`` of a config's vision tower, under the names the families use:
    width ``embed_dim`` (Qwen2-VL, whose ``hidden_size`` is the projector's output) or
    ``hidden_size``; MLP width ``intermediate_size`` or ``width · mlp_ratio``; heads ``num_heads``
    or ``num_attention_heads``."""
    v = getattr(config, "vision_config", None)
    if v is None:
        raise ValueError(f"config: model_type {getattr(config, 'model_type', None)!r} has no vision_config")
    width = getattr(v, "embed_dim", None) or v.hidden_size
    mlp = getattr(v, "intermediate_size", None) or int(width * v.mlp_ratio)
    heads = getattr(v, "num_heads", None) or v.num_attention_heads
    return int(width), int(mlp), int(heads)


def _refuse(name: str, reason: str) -> ValueError:
    return ValueError(f"path: the {name} family cannot be scored exactly: {reason}")


def _generic_class(config, name: str) -> type:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    try:
        cls: type = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(config)]  # type: ignore[assignment]
        return cls
    except KeyError:
        raise ValueError(
            f"path: expected a vision-language checkpoint ({', '.join(KNOWN)}, or any model_type "
            f"AutoModelForImageTextToText loads), got model_type {name!r}"
        ) from None


def _model_parts(cls: type, config, name: str) -> tuple[tuple[str, ...], bool]:
    """The vision modules of ``cls(config)`` (every child of ``model`` but ``language_model``) and
    whether it numbers M-RoPE positions, read off the model built on the meta device (no memory)."""
    from accelerate import init_empty_weights

    with init_empty_weights(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(config)
    inner = getattr(model, "model", None)
    if inner is None or getattr(inner, "language_model", None) is None:
        raise _refuse(name, "its decoder is not at model.language_model, where the scorer runs it")
    if not hasattr(inner, "get_image_features"):
        raise _refuse(name, "its model has no get_image_features to encode images with")
    vision = tuple(n for n, _ in inner.named_children() if n != "language_model")
    return vision, hasattr(inner, "get_rope_index")


def family_of(config) -> Family:
    """The ``Family`` of a transformers config (see the module docstring); a ``ValueError`` naming
    the family and the reason for one the scorer cannot take."""
    name = _family_name(config)
    if name in REFUSED:
        raise _refuse(name, REFUSED[name])
    image_token_id = getattr(config, "image_token_id", None)
    vision = getattr(config, "vision_config", None)
    if name in KNOWN:
        import transformers

        facts = dict(KNOWN[name])
        cls = getattr(transformers, facts.pop("model_class"))
    else:
        cls = _generic_class(config, name)
        modules, mrope = _model_parts(cls, config, name)
        if mrope:
            raise _refuse(name, "its M-RoPE positions are numbered in a way the packer does not know (only Qwen2-VL's)")
        facts = dict(image_format="processor", mrope=False, vision_modules=modules)
    if image_token_id is None or vision is None:
        raise _refuse(name, "its config names no image_token_id / vision_config: where image features go is unknown")
    patch = getattr(vision, "patch_size", 1)
    return Family(
        name=name,
        model_class=cls,
        merge_size=int(getattr(vision, "spatial_merge_size", 1)),
        patch_size=int(patch if isinstance(patch, int) else patch[0]),
        image_token_id=int(image_token_id),
        vision_dims=vision_dims(config),
        **facts,
    )
