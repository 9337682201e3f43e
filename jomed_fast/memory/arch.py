"""Model facts from a config.json: every weight tensor as (name, numel, kind).

``describe(config)`` turns a Qwen2-VL, Qwen2.5-VL or LLaVA/Pixtral config (dict, path, or a shipped
name) into an :class:`Arch`: the list of linear layers (in, out, bias; language-model or vision) and
of the other parameters (embeddings, norms, convs) that bitsandbytes keeps in the compute dtype.
Any other model type is refused with a ``ValueError`` naming it (the scorer reads the vision
dimensions of other families from ``readers.families`` instead; the planner needs every tensor).

Qwen2.5-VL differs from Qwen2-VL in the vision tower only: RMSNorms (weights only), a gated MLP
(gate / up / down, with biases) of ``intermediate_size``, width ``hidden_size`` (Qwen2-VL's
``embed_dim``) and the merger's output ``out_hidden_size``; its window attention has no weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from .._checks import positive_int

CONFIG_DIR = Path(__file__).parent / "configs"
SHIPPED = {
    "qwen2_vl_7b": "qwen2_vl_7b_instruct.json",
    "qwen2-vl-7b-instruct": "qwen2_vl_7b_instruct.json",
    "pixtral_12b": "pixtral_12b.json",
    "pixtral-12b": "pixtral_12b.json",
}


FAMILIES = ("qwen2_vl", "qwen2_5_vl", "pixtral")


@dataclass(frozen=True)
class Linear:
    name: str
    d_in: int
    d_out: int
    bias: bool
    part: str  # "text" | "vision" | "lm_head"

    @property
    def numel(self) -> int:
        return self.d_in * self.d_out


@dataclass(frozen=True)
class DecoderShape:
    """The language model's dimensions: H, ℓ, heads, kv_heads, d, I, V (what the FLOP model needs)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    def __post_init__(self):
        for f in fields(DecoderShape):
            positive_int(f"{type(self).__name__}.{f.name}", getattr(self, f.name))

    def decoder(self) -> DecoderShape:
        """Just the language model's dimensions (from an ``Arch``, which has them too)."""
        return DecoderShape(**{f.name: getattr(self, f.name) for f in fields(DecoderShape)})


@dataclass(frozen=True)
class Arch(DecoderShape):
    """A whole model: the decoder's dimensions, the vision tower's, and every weight tensor."""

    family: str = ""  # one of FAMILIES (defaults only because the base fields come first)
    vision_layers: int = 0
    vision_hidden: int = 0
    vision_intermediate: int = 0
    vision_heads: int = 0
    patch: int = 0
    merge: int = 0
    patch_inputs: int = 0  # values one patch feeds the vision tower: channels x (temporal patch) x patch^2
    linears: list[Linear] = field(default_factory=list)
    dense: dict[str, int] = field(default_factory=dict)  # unquantizable params: name -> numel

    def __post_init__(self):
        super().__post_init__()
        if self.family not in FAMILIES:
            raise ValueError(f"Arch.family: expected one of {FAMILIES}, got {self.family!r}")

    @property
    def text_linears(self) -> list[Linear]:
        return [lin for lin in self.linears if lin.part == "text"]


def load_config(config) -> dict:
    """A config as a dict: a dict, a transformers config object, a shipped name (``SHIPPED``), a
    config.json path or its directory."""
    if isinstance(config, dict):
        return config
    if hasattr(config, "to_dict") and hasattr(config, "model_type"):  # a PretrainedConfig
        return config.to_dict()
    if not isinstance(config, (str, os.PathLike)):
        raise TypeError(f"config: expected a dict, a shipped name or a path, got {type(config).__name__}")
    key = str(config)
    if key.lower() in SHIPPED:
        return json.loads((CONFIG_DIR / SHIPPED[key.lower()]).read_text())
    p = Path(config)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ValueError(f"config: expected one of {sorted(SHIPPED)} or a config.json path, got {key!r}")
    return json.loads(p.read_text())


def _add_text_decoder(a: Arch, qkv_bias: bool) -> None:
    """The LLaMA-style decoder both families share: per layer q/k/v/o + gated MLP and two RMSNorms,
    then the final norm, the token embedding and an untied LM head."""
    H, n, nh, kv, hd, I, V = a.hidden, a.layers, a.heads, a.kv_heads, a.head_dim, a.intermediate, a.vocab
    for i in range(n):
        p = f"text.{i}."
        a.linears.extend(
            [
                Linear(p + "q", H, nh * hd, qkv_bias, "text"),
                Linear(p + "k", H, kv * hd, qkv_bias, "text"),
                Linear(p + "v", H, kv * hd, qkv_bias, "text"),
                Linear(p + "o", nh * hd, H, False, "text"),
                Linear(p + "gate", H, I, False, "text"),
                Linear(p + "up", H, I, False, "text"),
                Linear(p + "down", I, H, False, "text"),
            ]
        )
        a.dense[p + "norms"] = 2 * H
    a.dense["text.final_norm"] = H
    a.dense["embed_tokens"] = V * H
    a.linears.append(Linear("lm_head", H, V, False, "lm_head"))


def _qwen_text(c: dict) -> dict:
    """The Qwen2 decoder's dimensions (under ``text_config`` or, in older configs, at the top)."""
    t = c.get("text_config") or c

    def g(k):
        return t.get(k, c.get(k))

    H, nh = g("hidden_size"), g("num_attention_heads")
    return dict(
        hidden=H,
        layers=g("num_hidden_layers"),
        heads=nh,
        kv_heads=g("num_key_value_heads"),
        head_dim=H // nh,
        intermediate=g("intermediate_size"),
        vocab=g("vocab_size"),
    )


def _qwen_vision_base(v: dict, E: int, mlp: int, family: str, c: dict) -> Arch:
    merge, patch, tps = v["spatial_merge_size"], v["patch_size"], v.get("temporal_patch_size", 2)
    channels = v.get("in_chans", v.get("in_channels", 3))
    a = Arch(
        **_qwen_text(c),
        family=family,
        vision_layers=v["depth"],
        vision_hidden=E,
        vision_intermediate=mlp,
        vision_heads=v["num_heads"],
        patch=patch,
        merge=merge,
        patch_inputs=channels * tps * patch * patch,
    )
    _add_text_decoder(a, qkv_bias=True)  # Qwen2 has q/k/v biases
    a.dense["vision.patch_embed"] = E * a.patch_inputs
    return a


def _qwen2_vl(c: dict) -> Arch:
    v = c["vision_config"]
    E, depth = v["embed_dim"], v["depth"]
    mlp = int(E * v["mlp_ratio"])
    a = _qwen_vision_base(v, E, mlp, "qwen2_vl", c)
    out_dim = v.get("hidden_size", a.hidden)
    for i in range(depth):
        p = f"vision.{i}."
        a.linears.extend(
            [
                Linear(p + "qkv", E, 3 * E, True, "vision"),
                Linear(p + "proj", E, E, True, "vision"),
                Linear(p + "fc1", E, mlp, True, "vision"),
                Linear(p + "fc2", mlp, E, True, "vision"),
            ]
        )
        a.dense[p + "norms"] = 4 * E  # two LayerNorms, weight + bias
    m = E * a.merge * a.merge
    a.dense["vision.merger.ln_q"] = 2 * E
    a.linears.extend(
        [Linear("vision.merger.fc1", m, m, True, "vision"), Linear("vision.merger.fc2", m, out_dim, True, "vision")]
    )
    return a


def _qwen2_5_vl(c: dict) -> Arch:
    v = c["vision_config"]
    E, mlp, depth = v["hidden_size"], v["intermediate_size"], v["depth"]
    a = _qwen_vision_base(v, E, mlp, "qwen2_5_vl", c)
    out_dim = v.get("out_hidden_size", a.hidden)
    for i in range(depth):
        p = f"vision.{i}."
        a.linears.extend(
            [
                Linear(p + "qkv", E, 3 * E, True, "vision"),
                Linear(p + "proj", E, E, True, "vision"),
                Linear(p + "gate", E, mlp, True, "vision"),
                Linear(p + "up", E, mlp, True, "vision"),
                Linear(p + "down", mlp, E, True, "vision"),
            ]
        )
        a.dense[p + "norms"] = 2 * E  # two RMSNorms, weight only
    m = E * a.merge * a.merge
    a.dense["vision.merger.ln_q"] = E
    a.linears.extend(
        [Linear("vision.merger.fc1", m, m, True, "vision"), Linear("vision.merger.fc2", m, out_dim, True, "vision")]
    )
    return a


def _pixtral(c: dict) -> Arch:
    t, v = c["text_config"], c["vision_config"]
    H, I, n, nh, kv, V = (
        t["hidden_size"],
        t["intermediate_size"],
        t["num_hidden_layers"],
        t["num_attention_heads"],
        t["num_key_value_heads"],
        t["vocab_size"],
    )
    hd = t.get("head_dim") or H // nh
    Hv, Iv, nv = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    a = Arch(
        hidden=H,
        layers=n,
        heads=nh,
        kv_heads=kv,
        head_dim=hd,
        intermediate=I,
        vocab=V,
        family="pixtral",
        vision_layers=nv,
        vision_hidden=Hv,
        vision_intermediate=Iv,
        vision_heads=v["num_attention_heads"],
        patch=v["patch_size"],
        merge=1,
        patch_inputs=v.get("num_channels", 3) * v["patch_size"] ** 2,
    )
    _add_text_decoder(a, qkv_bias=False)  # Mistral has none
    for i in range(nv):
        p = f"vision.{i}."
        a.linears.extend([Linear(p + n_, Hv, Hv, False, "vision") for n_ in ("q", "k", "v", "o")])
        a.linears.extend(
            [
                Linear(p + "gate", Hv, Iv, False, "vision"),
                Linear(p + "up", Hv, Iv, False, "vision"),
                Linear(p + "down", Iv, Hv, False, "vision"),
            ]
        )
        a.dense[p + "norms"] = 2 * Hv
    a.dense["vision.patch_conv"] = Hv * a.patch_inputs
    a.dense["vision.ln_pre"] = Hv
    bias = c.get("multimodal_projector_bias", True)
    a.linears.extend([Linear("projector.1", Hv, H, bias, "vision"), Linear("projector.2", H, H, bias, "vision")])
    return a


def describe(config) -> Arch:
    c = load_config(config)
    mt = c.get("model_type")
    if mt == "qwen2_vl":
        return _qwen2_vl(c)
    if mt == "qwen2_5_vl":
        return _qwen2_5_vl(c)
    if mt == "llava" and (c.get("vision_config") or {}).get("model_type") == "pixtral":
        return _pixtral(c)
    vision = (c.get("vision_config") or {}).get("model_type")
    raise ValueError(
        f"config: expected model_type 'qwen2_vl', 'qwen2_5_vl' or 'llava' with a pixtral vision tower, got {mt!r}"
        + (f" (vision tower {vision!r})" if mt == "llava" else "")
    )
