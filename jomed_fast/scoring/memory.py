"""How many rows a forward may take: a byte budget divided by the bytes one row needs.

A *row* is one sequence the decoder runs: a prefix (prefix stage) or one candidate's suffix with its
class-trie nodes (suffix stage). For a row of ``q`` new tokens attending to ``kv = past + q`` keys,
with the reader's L layers, hidden H, MLP width I, heads h / KV heads g of size d, element size e:

=====================  ==============================================================
KV cache               L · 2 · g · d · kv · e   (the prefix part is the copy the row's cache holds)
layer activations      q · (4H + 2·h·d + 2·g·d + 3I) · e   (one layer's live tensors, inference)
attention scores       h · q · kv · (e + 4)     (scores in the compute dtype + fp32 softmax)
embeddings / hidden    2 · q · H · e
=====================  ==============================================================

With autograd on, every layer keeps its activations for the backward pass: the activation and
score terms are counted L times. These are estimates for sizing chunks (on CUDA the caching
allocator and kernels' workspaces add some): the budget should leave headroom, and the default
takes a fraction of what is free.

Default budget: on CUDA 50 % of the free device memory (``torch.cuda.mem_get_info``) at the time
of the call; on CPU 25 % of the available RAM, clamped to [256 MiB, 8 GiB].
"""

from __future__ import annotations

import os

import torch

MIN_CPU_BUDGET = 256 << 20
MAX_CPU_BUDGET = 8 << 30


def default_budget(device: torch.device) -> int:
    """Bytes the scorer may use for one chunk's activations (see the module docstring)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return max(int(free * 0.5), 64 << 20)
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        avail = 4 << 30
    return int(min(max(avail // 4, MIN_CPU_BUDGET), MAX_CPU_BUDGET))


def check_budget(memory_budget) -> int | None:
    if memory_budget is None:
        return None
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget <= 0:
        raise ValueError(f"memory_budget: expected None or a positive number of bytes (int), got {memory_budget!r}")
    return memory_budget


class RowCost:
    """The reader's dimensions, and the bytes of one row (see the module docstring)."""

    def __init__(self, reader):
        text = reader.config.get_text_config()
        self.layers = reader.num_layers
        self.hidden = reader.hidden_size
        self.intermediate = int(getattr(text, "intermediate_size", 4 * self.hidden))
        self.heads = reader.num_heads
        self.kv_heads = reader.num_kv_heads
        self.head_dim = reader.head_dim
        self.elem = torch.empty((), dtype=reader.compute_dtype).element_size()

    def row_bytes(self, new_tokens: int, past: int, grad: bool = False) -> int:
        q, kv, e = max(new_tokens, 1), past + max(new_tokens, 1), self.elem
        kv_cache = self.layers * 2 * self.kv_heads * self.head_dim * kv * e
        layer = q * (4 * self.hidden + 2 * self.heads * self.head_dim + 2 * self.kv_heads * self.head_dim
                     + 3 * self.intermediate) * e
        scores = self.heads * q * kv * (e + 4)
        io = 2 * q * self.hidden * e
        if grad:
            layer, scores = layer * self.layers, scores * self.layers
        return int(kv_cache + layer + scores + io)

    def rows(self, budget: int, new_tokens: int, past: int, grad: bool = False) -> int:
        """Rows per forward within ``budget`` (at least 1)."""
        return max(1, budget // self.row_bytes(new_tokens, past, grad))

    def vision_patches(self, budget: int, vision_hidden: int, vision_intermediate: int, vision_heads: int) -> int:
        """Patches per vision-tower call within ``budget``: per patch, one layer's activations
        plus its attention row over the chunk (bounded by assuming the chunk is one image)."""
        e = self.elem
        per_patch = (4 * vision_hidden + 3 * vision_intermediate) * e
        # attention: heads * n * n * (e + 4) <= budget / 2  ->  n <= sqrt(budget / (2 heads (e + 4)))
        by_scores = int((budget / (2 * vision_heads * (e + 4))) ** 0.5)
        return max(1, min(budget // (2 * per_patch), by_scores))
