r"""The analytic FLOP model of candidate scoring: what each way of scoring B queries × K candidates
must compute, as pure functions of the reader's config and the prompts' token/image counts.

Counts are FLOPs of the matrix products (a multiply-add is 2 FLOPs); norms, activations, rotary
embeddings, softmax and embedding lookups are left out (they are O(H) per token against O(H²)).
Padding is not counted either: the model is the work a method's *structure* needs, so padding
waste shows up as a measured shortfall, not as predicted cost.

Shape letters: B queries, K candidates, C classes, V vocabulary, H hidden, L sequence, P prefix;
q = heads·d and g = kv_heads·d (d = head_dim), I the MLP width, ℓ layers.

Language model (SiLU-gated MLP, grouped-query attention), per layer:

* projections and MLP, per token:   ``2·(H·q + 2·H·g + q·H + 3·H·I)``
* attention, per query token that sees n keys (QKᵀ and AV):   ``4·n·q``

A forward of ``t`` new tokens after ``c`` cached ones (causal): the i-th new token sees
``c + i`` keys, so attention costs ``4·q·(t·c + t(t+1)/2)`` per layer (``c = 0``: no cache).

Head: ``2·H·V`` per position read from the full LM head, ``2·H·C`` for the class head.

Vision tower, per image of n patches (its own sequence: attention within the image only):

* Qwen2-VL (width E, MLP ratio r, merge m): patch embedding ``2·n·(3·t_p·p²)·E``; per block
  ``2·n·(3E² + E² + 2·r·E²) + 4·n²·E``; merger over n/m² tokens ``2·(n/m²)·((m²E)² + m²E·H)``.
* Qwen2.5-VL (width E, MLP width I_v, gated, merge m): as Qwen2-VL with per block
  ``2·n·(4E² + 3·E·I_v) + 4·n²·E`` (full attention in every block: an upper bound, as most blocks
  attend within windows).
* Pixtral (width E, MLP width I_v, gated): patch embedding ``2·n·3·p²·E``; per block
  ``2·n·(4E² + 3·E·I_v) + 4·n²·E``; projector ``2·n·(E·H + H·H)``.

Methods (``Prompt`` describes one of the B·K prompts; see ``scoring.__init__`` for the layouts):

* ``hf_forward_flops``: every prompt whole (``P + S`` tokens), every image of it through the
  tower, the full-vocabulary head at its last position (``logits_to_keep=1``).
* ``generate_flops``: ``generate(max_new_tokens=T, use_cache=False)``: step j (0-based) runs the
  whole prompt plus the j tokens generated so far again, and the full head at one position. The
  vision tower runs at step 0 only: transformers 5's ``prepare_inputs_for_generation`` passes
  ``pixel_values`` on the first iteration only (``images_every_step=True`` models a version that
  re-encodes them at every step).
* ``shared_prefix_flops`` (the toolkit): each distinct image once; each distinct prefix once
  (``P`` tokens); each row's suffix (``S`` tokens, plus the class trie's N nodes) attending to its
  cached prefix; the class head (``C`` columns; ``A`` allowed tokens at 1 + N positions in
  ``sequence`` mode). Trie nodes are counted as causal tokens after the suffix (they attend to the
  suffix and their ancestors only: a slight over-count of their attention).

``predicted_speedup(baseline, method) = baseline.total / method.total``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence

from .._checks import check_int, positive_int
from ..memory.arch import DecoderShape, describe

__all__ = [
    "DecoderShape",
    "Flops",
    "Prompt",
    "VisionShape",
    "attention_flops",
    "decoder_flops",
    "decoder_linear_flops",
    "decoder_shape",
    "generate_flops",
    "head_flops",
    "hf_forward_flops",
    "predicted_speedup",
    "shared_prefix_flops",
    "vision_flops",
    "vision_shape",
]

VISION_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "pixtral")


# ---------------------------------------------------------------------------------------------
# Shapes from a config
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VisionShape:
    """The vision tower's dimensions (``family`` picks the block structure, see the module doc).

    ``patch_inputs``: values per patch (3·t_p·p² / 3·p²); ``merge``: patches per output token
    (m², 1 for Pixtral); ``out_hidden``: the language model's H (the projector's output).
    """

    family: str
    hidden: int
    layers: int
    intermediate: int
    patch_inputs: int
    merge: int
    out_hidden: int

    def __post_init__(self):
        if self.family not in VISION_FAMILIES:
            raise ValueError(f"VisionShape.family: expected one of {VISION_FAMILIES}, got {self.family!r}")
        for f in dataclasses.fields(self)[1:]:
            positive_int(f"VisionShape.{f.name}", getattr(self, f.name))


def decoder_shape(config) -> DecoderShape:
    """``DecoderShape`` of a Qwen2-VL, Qwen2.5-VL or Pixtral-LLaVA config (object, dict or path). The config
    facts are read once, by ``jomed_fast.memory.arch.describe`` (what the memory planner uses)."""
    return describe(config).decoder()


def vision_shape(config) -> VisionShape:
    """``VisionShape`` of a Qwen2-VL, Qwen2.5-VL or Pixtral-LLaVA config (via ``memory.arch.describe``)."""
    a = describe(config)
    return VisionShape(
        family=a.family,
        hidden=a.vision_hidden,
        layers=a.vision_layers,
        intermediate=a.vision_intermediate,
        patch_inputs=a.patch_inputs,
        merge=a.merge * a.merge,
        out_hidden=a.hidden,
    )


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------
def decoder_linear_flops(dec: DecoderShape, tokens: int) -> int:
    """Projections + MLP of ``tokens`` tokens through all ℓ layers."""
    q, g, H = dec.heads * dec.head_dim, dec.kv_heads * dec.head_dim, dec.hidden
    per_token = 2 * (H * q + 2 * H * g + q * H + 3 * H * dec.intermediate)
    return dec.layers * per_token * check_int("tokens", tokens, 0)


def attention_flops(dec: DecoderShape, tokens: int, cached: int = 0, causal: bool = True) -> int:
    """QKᵀ + AV of ``tokens`` new tokens after ``cached`` ones, all layers. ``causal=False``
    counts the dense ``tokens × (cached + tokens)`` rectangle (what an explicit-mask kernel does)."""
    t, c = check_int("tokens", tokens, 0), check_int("cached", cached, 0)
    keys = t * c + (t * (t + 1) // 2 if causal else t * t)
    return dec.layers * 4 * dec.heads * dec.head_dim * keys


def decoder_flops(dec: DecoderShape, tokens: int, cached: int = 0) -> int:
    """A causal forward of ``tokens`` tokens after ``cached`` cached ones (no head)."""
    return decoder_linear_flops(dec, tokens) + attention_flops(dec, tokens, cached)


def head_flops(dec: DecoderShape, positions: int, columns: int | None = None) -> int:
    """The LM head at ``positions`` positions over ``columns`` rows of it (default: all V)."""
    cols = dec.vocab if columns is None else positive_int("columns", columns)
    return 2 * dec.hidden * cols * check_int("positions", positions, 0)


def vision_flops(vis: VisionShape, patches: int) -> int:
    """Vision tower + projector over one image of ``patches`` patches."""
    n, E = check_int("patches", patches, 0), vis.hidden
    embed = 2 * n * vis.patch_inputs * E
    attention = 4 * n * n * E
    if vis.family in ("qwen2_vl", "qwen2_5_vl"):
        mlp_matmuls = 2 if vis.family == "qwen2_vl" else 3  # fc1, fc2 / gate, up, down
        # Qwen2.5-VL's windowed blocks attend over less than n²: counting every block as full
        # attention is an upper bound on its vision cost
        block = 2 * n * (4 * E * E + mlp_matmuls * E * vis.intermediate) + attention
        tokens = n // vis.merge
        merged = vis.merge * E
        project = 2 * tokens * (merged * merged + merged * vis.out_hidden)
    else:
        block = 2 * n * (4 * E * E + 3 * E * vis.intermediate) + attention
        project = 2 * n * (E * vis.out_hidden + vis.out_hidden * vis.out_hidden)
    return embed + vis.layers * block + project


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Flops:
    """FLOPs split by where they go."""

    vision: int = 0
    llm: int = 0
    head: int = 0

    @property
    def total(self) -> int:
        return self.vision + self.llm + self.head

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.vision + other.vision, self.llm + other.llm, self.head + other.head)


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One of the B·K prompts, split where its query's K prompts stop sharing tokens.

    Attributes:
        prefix: ``(key, P)``: the shared prefix's identity (equal keys: one prefix, run once by a
            method that caches it) and its token count, image tokens included.
        suffix: S, the prompt's remaining tokens (image tokens included).
        images: ``(key, patches)`` of each image in the prompt, prefix and suffix; equal keys are
            one image (encoded once by a method that deduplicates).
    """

    prefix: tuple[Hashable, int]
    suffix: int
    images: tuple[tuple[Hashable, int], ...] = ()

    def __post_init__(self):
        check_int("Prompt.prefix[1]", self.prefix[1], 0)
        check_int("Prompt.suffix", self.suffix, 0)
        if self.prefix[1] + self.suffix < 1:
            raise ValueError("Prompt: expected at least one token (prefix + suffix), got 0")
        for _, n in self.images:
            check_int("Prompt.images[][1]", n, 0)

    @property
    def tokens(self) -> int:
        return self.prefix[1] + self.suffix


def _check_prompts(prompts: Sequence[Prompt]) -> list[Prompt]:
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, Prompt) for p in prompts):
        raise ValueError("prompts: expected a non-empty sequence of flops.Prompt")
    return prompts


def hf_forward_flops(dec: DecoderShape, vis: VisionShape, prompts: Sequence[Prompt]) -> Flops:
    """Each prompt whole through the model, full-vocabulary head at its last position."""
    total = Flops()
    for p in _check_prompts(prompts):
        total += Flops(
            vision=sum(vision_flops(vis, n) for _, n in p.images),
            llm=decoder_flops(dec, p.tokens),
            head=head_flops(dec, 1),
        )
    return total


def generate_flops(
    dec: DecoderShape,
    vis: VisionShape,
    prompts: Sequence[Prompt],
    steps: Sequence[int] | int,
    images_every_step: bool = False,
) -> Flops:
    """``generate(use_cache=False)`` running ``steps`` decoding steps per prompt (an int for all,
    or one count per prompt): step j recomputes the prompt and the j new tokens; the images run
    at step 0 (every step with ``images_every_step``)."""
    prompts = _check_prompts(prompts)
    steps = [steps] * len(prompts) if isinstance(steps, int) else list(steps)
    if len(steps) != len(prompts):
        raise ValueError(f"steps: expected an int or {len(prompts)} counts, got {len(steps)}")
    total = Flops()
    for p, T in zip(prompts, steps):
        image = sum(vision_flops(vis, n) for _, n in p.images)
        for j in range(positive_int("steps[]", T)):
            total += Flops(
                vision=image if j == 0 or images_every_step else 0,
                llm=decoder_flops(dec, p.tokens + j),
                head=head_flops(dec, 1),
            )
    return total


def shared_prefix_flops(
    dec: DecoderShape,
    vis: VisionShape,
    prompts: Sequence[Prompt],
    num_classes: int,
    class_nodes: int = 0,
    allowed_tokens: int | None = None,
) -> Flops:
    """The toolkit: distinct images once, distinct prefixes once, suffixes on the cached prefix,
    the class head (``first_token``: C columns at one position; ``sequence`` mode with N =
    ``class_nodes`` trie nodes: ``allowed_tokens`` columns at 1 + N positions)."""
    prompts = _check_prompts(prompts)
    positive_int("num_classes", num_classes)
    check_int("class_nodes", class_nodes, 0)
    if class_nodes and allowed_tokens is None:
        raise ValueError("allowed_tokens: expected the number of allowed tokens when class_nodes > 0, got None")
    images: dict[Hashable, int] = {}
    prefixes: dict[Hashable, int] = {}
    for p in prompts:
        images.update(p.images)
        prefixes.setdefault(p.prefix[0], p.prefix[1])
    vision = sum(vision_flops(vis, n) for n in images.values())
    llm = sum(decoder_flops(dec, P) for P in prefixes.values() if P)
    llm += sum(decoder_flops(dec, p.suffix + class_nodes, cached=p.prefix[1]) for p in prompts)
    if class_nodes:
        head = head_flops(dec, len(prompts) * (1 + class_nodes), allowed_tokens)
    else:
        head = head_flops(dec, len(prompts), num_classes)
    return Flops(vision=vision, llm=llm, head=head)


def predicted_speedup(baseline: Flops, method: Flops) -> float:
    """``baseline.total / method.total``: the speed-up a method would show if time were FLOPs."""
    if method.total <= 0:
        raise ValueError(f"method: expected a positive FLOP count, got {method.total}")
    return baseline.total / method.total
