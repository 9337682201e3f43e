"""Peak GPU memory of a JOMED run: ``plan(config, run) -> MemoryPlan``.

Tokens in flight (T) per forward, with ``n_img`` image tokens per image, prefix ``p`` (query
text), per-candidate suffix ``s`` (candidate caption/report), ``c`` = chunk size (candidates per
forward, at most K), ``B`` = batch (queries):

* ``paper`` layout, every candidate is its own prompt ``(i_k, t_k) ∘ (i_d, q_d)``:
  T = B · c · (p + s + 2 · n_img)
* ``shared_query``: the query prefix runs once, candidates are suffixes on its KV:
  T = B · (p + n_img + c · (s + n_img))

Rows (element size e = 2, bf16 on the L40; LoRA and optimizer states in fp32):

* weights: see :mod:`jomed_fast.memory.weights` (NF4 blocks, double-quantized absmax, 16-bit rest).
* LoRA: 4 B/param; training adds fp32 gradients (4 B) and AdamW m, v (8 B) for trainable params.
* activations, training with checkpointing: the input of every decoder layer kept
  (L · T · H · e) + one layer recomputed with autograd on (T · a_layer); without checkpointing
  L · T · a_layer. a_layer = e · (2H + (h + 2g)·d + h·d + 4I + 7r) + 4 · (2H + h)
  (two norm outputs, q/k/v, attention output, gate/up/act/product, LoRA intermediates; fp32 norm
  inputs and the attention log-sum-exp). Attention is SDPA/flash: no T² scores are stored
  (``attention="eager"`` adds h · T_seq · T · (e + 4) for one layer).
* activations, no grad (scoring, inference): one layer's live tensors T · e · (4H + 2hd + 2gd + 3I).
* vision tower (frozen, no grad): one layer's live tensors for the images in flight
  (patches = n_img · merge², per image) + their merged embeddings.
* KV-cache (no-grad stages; HF keeps a DynamicCache): L · 2 · g · d · e per cached token; paper
  caches c · (p + s + 2 n_img) per query, shared_query the prefix once + c suffixes.
* class-head outputs: hidden at the answer position B · K · H · e + log-probs B · K · C · 4; the
  HF baseline's full logits T · V · 4 (fp32) are shown as a comparison row, not added.
* retriever (stage 2 training): ``retriever_params`` (default 196 M, BiomedCLIP size) · 16 B
  (fp32 weights + grads + AdamW) + its activations (``retriever_act_bytes``, default 1 GiB);
  inference: the retriever in 16-bit.
* index (stage 2 and inference with ``index_rows``, ``Index.to``): heads · N · D · 2 bytes of fp16
  rows (6.48 GB for the paper's 2.1M x 768 x 2 heads); the top-k's per-split candidates (kilobytes
  per query) fall in the workspace allowance.
* workspace allowance: 512 MiB (cuBLAS workspaces, allocator slack) + the largest linear
  dequantized to 16-bit (bitsandbytes dequantizes a 4-bit weight for the backward and for
  prefill matmuls) + 10 % of everything above for caching-allocator fragmentation, plus the CUDA
  context (~500 MiB, outside torch's allocator).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass, field

from .._checks import check_int, positive_int
from ..prompts import LAYOUTS
from .arch import Arch, describe
from .weights import QUANTIZATIONS, largest_linear, lora_params, weight_bytes

STAGES = ("stage1", "stage2", "inference")
GiB = 1 << 30
MiB = 1 << 20


@dataclass
class Run:
    stage: str = "stage1"
    K: int = 4
    batch: int = 1
    prefix_tokens: int = 64
    suffix_tokens: int = 128
    image_tokens: int = 256
    quantization: str = "nf4"
    lora_rank: int = 8
    gradient_checkpointing: bool = True
    layout: str = "paper"
    chunk_size: int | None = None  # candidates per forward; None = K
    num_classes: int = 2
    elem_bytes: int = 2
    quantize_vision: bool = True
    attention: str = "sdpa"
    retriever_params: int = 196_000_000
    retriever_act_bytes: int = GiB
    workspace_base: int = 512 * MiB
    cuda_context: int = 500 * MiB
    fragmentation: float = 0.10
    # a retrieval index resident on the GPU (``Index.to``): rows x dim fp16 per head; 0 keeps it on
    # the CPU (memory-mapped), the default. The paper's index: 2_108_000 rows x 768, two heads.
    index_rows: int = 0
    index_dim: int = 768
    index_heads: int = 2

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage: expected one of {STAGES}, got {self.stage!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {self.layout!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization: expected one of {QUANTIZATIONS}, got {self.quantization!r}")
        positive_int("K", self.K)
        positive_int("batch", self.batch)
        positive_int("chunk_size", self.chunk_size, optional=True)
        check_int("index_rows", self.index_rows, 0)
        positive_int("index_dim", self.index_dim)
        check_int("index_heads", self.index_heads, 1, 2)

    @property
    def chunk(self) -> int:
        return min(self.chunk_size or self.K, self.K)

    def replace(self, **kw) -> "Run":
        return dataclasses.replace(self, **kw)


@dataclass
class MemoryPlan:
    model: str
    run: Run
    rows: "OrderedDict[str, int]"  # counted in the peak
    comparison: "OrderedDict[str, int]" = field(default_factory=OrderedDict)  # shown, not counted
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    def fits(self, budget_bytes: int) -> bool:
        return self.total <= budget_bytes

    def table(self) -> list[tuple[str, int]]:
        return list(self.rows.items()) + [("total (peak)", self.total)]


def tokens_in_flight(run: Run) -> tuple[int, int, int]:
    """(T tokens per forward, longest sequence, images in flight)."""
    c, n = run.chunk, run.image_tokens
    if run.layout == "paper":
        seq = run.prefix_tokens + run.suffix_tokens + 2 * n
        return run.batch * c * seq, seq, run.batch * c * 2
    seq = run.prefix_tokens + n + run.suffix_tokens + n
    return run.batch * (run.prefix_tokens + n + c * (run.suffix_tokens + n)), seq, run.batch * (1 + c)


def layer_activation_bytes(a: Arch, e: int, r: int) -> int:
    """Bytes per token one decoder layer keeps for its backward (see module docstring)."""
    H, I, h, g, d = a.hidden, a.intermediate, a.heads, a.kv_heads, a.head_dim
    return e * (2 * H + (h + 2 * g) * d + h * d + 4 * I + 7 * r) + 4 * (2 * H + h)


def layer_live_bytes(a: Arch, e: int) -> int:
    """Bytes per token one decoder layer holds live in a no-grad forward."""
    H, I, h, g, d = a.hidden, a.intermediate, a.heads, a.kv_heads, a.head_dim
    return e * (4 * H + 2 * h * d + 2 * g * d + 3 * I)


def vision_live_bytes(a: Arch, e: int, image_tokens: int, images: int) -> int:
    patches = image_tokens * a.merge * a.merge * images
    per_patch = e * (4 * a.vision_hidden + 2 * a.vision_intermediate)
    return patches * per_patch + images * image_tokens * a.hidden * e


def plan(config, run: Run | dict | None = None, name: str | None = None) -> MemoryPlan:
    """Predict the peak GPU memory of ``run`` for the model of ``config`` (dict, path or shipped name)."""
    if run is None:
        run = Run()
    elif isinstance(run, dict):
        run = Run(**run)
    elif not isinstance(run, Run):
        raise TypeError(f"run: expected a Run or a dict, got {type(run).__name__}")
    a = describe(config)
    e = run.elem_bytes
    rows: OrderedDict[str, int] = OrderedDict()
    for k, v in weight_bytes(a, run.quantization, e, run.quantize_vision).items():
        rows[f"weights: {k}"] = v
    n_lora = lora_params(a, run.lora_rank)
    rows["LoRA weights (fp32)"] = 4 * n_lora
    T, seq, images = tokens_in_flight(run)
    train_reader = run.stage == "stage1"
    if train_reader:
        rows["LoRA gradients (fp32)"] = 4 * n_lora
        rows["AdamW states (fp32 m, v)"] = 8 * n_lora
        per_layer = layer_activation_bytes(a, e, run.lora_rank)
        if run.gradient_checkpointing:
            rows["activations: layer boundaries (checkpointed)"] = a.layers * T * a.hidden * e
            rows["activations: one layer recomputed"] = T * per_layer
        else:
            rows["activations: all layers (no checkpointing)"] = a.layers * T * per_layer
        if run.attention == "eager":
            rows["attention scores (eager, one layer)"] = a.heads * seq * T * (e + 4)
        rows["KV-cache"] = 0
    else:
        rows["activations: one layer live (no grad)"] = T * layer_live_bytes(a, e)
        if run.attention == "eager":
            rows["attention scores (eager, one layer)"] = a.heads * seq * T * (e + 4)
        cached = T  # paper: every candidate's full prompt; shared_query: prefix once + suffixes
        rows["KV-cache"] = a.layers * 2 * a.kv_heads * a.head_dim * e * cached
    rows["embeddings in flight"] = 2 * T * a.hidden * e
    rows["vision tower (frozen, one layer live)"] = vision_live_bytes(a, e, run.image_tokens, images)
    rows["class-head outputs"] = run.batch * run.K * (a.hidden * e + run.num_classes * 4)
    if run.stage == "stage2":
        rows["retriever training (fp32 w + grad + AdamW)"] = 16 * run.retriever_params
        rows["retriever activations"] = run.retriever_act_bytes
    elif run.stage == "inference":
        rows["retriever (16-bit, frozen)"] = e * run.retriever_params
    if run.index_rows and run.stage != "stage1":  # stage 1 reads its candidates from the CPU once
        rows["index on the GPU (fp16 heads)"] = run.index_heads * run.index_rows * run.index_dim * 2
    big = largest_linear(a)
    sub = sum(rows.values())
    rows["workspace: dequantized weight + cuBLAS"] = run.workspace_base + (
        big.numel * e if run.quantization != "none" else 0
    )
    rows["workspace: allocator fragmentation"] = int(run.fragmentation * sub)
    rows["CUDA context"] = run.cuda_context
    comp: OrderedDict[str, int] = OrderedDict()
    comp["HF baseline: full logits [T, V] fp32"] = T * a.vocab * 4
    comp["jomed_fast: class log-probs [B, K, C] fp32"] = run.batch * run.K * run.num_classes * 4
    notes = [
        f"T = {T} tokens per forward (layout {run.layout}, chunk {run.chunk} of K={run.K}, batch {run.batch})",
        f"LoRA r={run.lora_rank}: {n_lora / 1e6:.1f} M trainable params",
    ]
    return MemoryPlan(name or a.family, run, rows, comp, notes)


GB = 10**9


def _fmt(b: int) -> str:
    return f"{b / GB:.2f}"


def format_table(p: MemoryPlan) -> str:
    """The plan as a Markdown table (GB = 1e9 bytes)."""
    r = p.run
    lines = [
        f"**{p.model}**, {r.stage}: K={r.K}, batch={r.batch}, chunk={r.chunk}, layout={r.layout}, "
        f"{r.quantization}, LoRA r={r.lora_rank}, checkpointing={'on' if r.gradient_checkpointing else 'off'}",
        "",
        "| component | GB |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in p.rows.items()]
    lines.append(f"| **total (peak)** | **{_fmt(p.total)}** |")
    lines += [f"| _comparison: {k}_ | _{_fmt(v)}_ |" for k, v in p.comparison.items()]
    lines += [""] + [f"- {n}" for n in p.notes]
    return "\n".join(lines)


def suggest(config, run: Run | dict, budget: int) -> tuple[Run, MemoryPlan] | None:
    """The fastest-looking settings under ``budget`` bytes, or None if nothing fits.

    Search order (first fit wins): keep the batch as large as possible, then the chunk as large as
    possible, then checkpointing off before on (training only), then shared_query before paper when
    the run asked for shared_query (never switches layout otherwise: it changes the prompts)."""
    base = Run(**run) if isinstance(run, dict) else run
    if not isinstance(budget, (int, float)) or budget <= 0:
        raise ValueError(f"budget: expected a positive byte count, got {budget!r}")
    chunks = sorted({c for c in (base.K, 32, 16, 8, 4, 2, 1) if c <= base.K}, reverse=True)
    ckpts = (False, True) if base.stage == "stage1" else (base.gradient_checkpointing,)
    b = base.batch
    while b >= 1:
        for c in chunks:
            for ck in ckpts:
                cand = base.replace(batch=b, chunk_size=c, gradient_checkpointing=ck)
                p = plan(config, cand)
                if p.fits(budget):
                    return cand, p
        b //= 2
    return None
