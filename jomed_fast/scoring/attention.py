"""Attention masks and the shared-prefix KV-cache of the suffix forward.

The decoder runs each chunk of candidate rows with

* ``cache``: the prefix's keys/values, one ``[U, g, Pm, d]`` tensor pair per layer
  computed once per distinct prefix. A chunk whose rows share one prefix gets it ``expand``-ed
  (a stride-0 view, no copy); a chunk mixing queries gets ``index_select``-ed rows. The Hugging
  Face attention path then concatenates ``[prefix, suffix]`` keys per layer
  (``DynamicLayer.update``: ``torch.cat``), so each chunk's rows do hold a copy of the prefix K/V
  for the duration of the layer: that is the one copy made, per layer and chunk. What is shared
  is everything that costs compute: the prefix's projections, MLPs, attention and vision.
* ``attention_mask``: an explicit boolean 4-D mask ``[R, 1, q, Pm + q]`` (True = attend), which the
  Hugging Face mask builder passes through unchanged: the prefix's real slots, the row's own
  causal suffix, and for the class-trie nodes the row's whole suffix plus their trie ancestors.
  ``eager`` attention takes it as an additive float mask; ``sdpa`` as booleans.
"""

from __future__ import annotations

import dataclasses
from typing import cast

import torch
from transformers.cache_utils import Cache, DynamicLayer

SUPPORTED_ATTENTION = ("sdpa", "eager")


class _PrefixLayer(DynamicLayer):
    """A ``DynamicLayer`` that starts holding (a view of) the prefix's keys and values."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values


class PrefixKV:
    """Per-layer prefix keys/values ``[U, g, Pm, d]`` of U distinct prefixes (right-padded)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values

    @classmethod
    def from_cache(cls, cache: Cache) -> "PrefixKV":
        layers = cast(list[DynamicLayer], cache.layers)  # a DynamicCache: every layer holds keys and values
        return cls([cast(torch.Tensor, la.keys) for la in layers], [cast(torch.Tensor, la.values) for la in layers])

    @classmethod
    def concat(cls, parts: list["PrefixKV"]) -> "PrefixKV":
        if len(parts) == 1:
            return parts[0]
        n = len(parts[0].keys)
        return cls(
            [torch.cat([p.keys[i] for p in parts]) for i in range(n)],
            [torch.cat([p.values[i] for p in parts]) for i in range(n)],
        )

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[2]) if self.keys else 0

    def cache_for(self, prefix_index: torch.Tensor) -> Cache:
        """A cache whose row r holds prefix ``prefix_index[r]``: expanded when one prefix serves
        every row, gathered otherwise."""
        rows = prefix_index.numel()
        first = int(prefix_index[0])
        if bool((prefix_index == first).all()):
            pick = lambda t: t[first : first + 1].expand(rows, -1, -1, -1)  # noqa: E731
        else:
            index = prefix_index.to(self.keys[0].device)
            pick = lambda t: t.index_select(0, index)  # noqa: E731
        return Cache(layers=[_PrefixLayer(pick(k), pick(v)) for k, v in zip(self.keys, self.values)])


def check_attention(reader) -> str:
    impl = getattr(reader.decoder.config, "_attn_implementation", None) or "eager"
    if impl not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"reader: the scorer passes explicit 4-D attention masks, which attention implementation {impl!r} "
            f"cannot take; load the reader with one of {SUPPORTED_ATTENTION} (the default is 'sdpa')"
        )
    return impl


def to_model_mask(allowed: torch.Tensor, impl: str, dtype: torch.dtype) -> torch.Tensor:
    """Boolean ``[R, 1, q, kv]`` (True = attend) -> what attention implementation ``impl`` takes."""
    if impl == "sdpa":
        return allowed
    out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return out.masked_fill_(~allowed, torch.finfo(dtype).min)


def prefix_mask(lengths: torch.Tensor, P: int) -> torch.Tensor:
    """Boolean ``[U, 1, P, P]``: causal over each prefix's ``lengths[u]`` real tokens (padded
    query slots attend to themselves only, so no row is empty)."""
    ar = torch.arange(P, device=lengths.device)
    causal = ar[None, :] <= ar[:, None]  # [q, k]
    real_key = ar[None, :] < lengths[:, None]  # [U, k]
    allowed = causal[None] & real_key[:, None, :]
    allowed |= torch.eye(P, dtype=torch.bool, device=lengths.device)[None]
    return allowed[:, None]


def suffix_mask(
    prefix_lengths: torch.Tensor, Pm: int, suffix_lengths: torch.Tensor, L: int, node_ancestors: torch.Tensor
) -> torch.Tensor:
    """Boolean ``[R, 1, L + N, Pm + L + N]`` for R rows of ``L`` suffix slots then ``N`` trie nodes.

    Keys: ``Pm`` prefix slots (real below ``prefix_lengths[r]``), ``L`` suffix slots (real below
    ``suffix_lengths[r]``), ``N`` nodes. Suffix query i sees the real prefix, real suffix keys
    ``<= i`` and itself; node j sees the real prefix, the whole real suffix, and its ancestors.
    """
    device = suffix_lengths.device
    R, N = suffix_lengths.numel(), node_ancestors.shape[0]
    ar_p = torch.arange(Pm, device=device)
    ar_l = torch.arange(L, device=device)
    pre = (ar_p[None, :] < prefix_lengths[:, None])[:, None, :].expand(R, L + N, Pm)  # [R, q, Pm]
    real = ar_l[None, :] < suffix_lengths[:, None]  # [R, L]
    causal = ar_l[None, :] <= ar_l[:, None]  # [L(q), L(k)]
    suf_q = (causal[None] & real[:, None, :]) | torch.eye(L, dtype=torch.bool, device=device)[None]  # [R, L, L]
    node_q = real[:, None, :].expand(R, N, L)  # [R, N, L]
    top = torch.cat([suf_q, torch.zeros(R, L, N, dtype=torch.bool, device=device)], dim=2)
    bottom = torch.cat([node_q, node_ancestors.to(device)[None].expand(R, N, N)], dim=2)
    allowed = torch.cat([pre, torch.cat([top, bottom], dim=1)], dim=2)
    return allowed[:, None]


@dataclasses.dataclass
class Prefixes:
    """What the prefix stage produced: the KV-cache of the U distinct prefixes (None when every
    prefix is empty), which prefix each query reads (``[B]`` long), the padded prefix length Pm
    and the prefix rows per forward (0: none ran)."""

    kv: PrefixKV | None
    of_query: torch.Tensor
    length: int
    rows_per_chunk: int = 0

    def cache_for(self, queries: torch.Tensor):
        """The cache of rows belonging to ``queries`` (``[R]`` long), or None without a prefix."""
        return None if self.kv is None else self.kv.cache_for(self.of_query[queries])

    def shared(self, queries: torch.Tensor) -> bool:
        """Whether rows of ``queries`` all read one prefix (the cache is an expanded view then)."""
        u = self.of_query[queries]
        return self.kv is not None and bool((u == u[0]).all())
