r"""Multimodal retrieval index: fp16 L2-normalised image/text embeddings ``[N, D]`` + manifest.

Layout of ``out_dir``: ``image_embeddings.npy``, ``text_embeddings.npy`` (fp16 ``[N, D]``),
``records.jsonl`` (``{id, image_path, text, image_sha256}``, paths relative to the image root),
``manifest.json`` (count, dim, dtype, encoder fingerprint, image root relative to ``out_dir``,
sha256 per file). Search per head:
:math:`(\text{scores}, \text{ids}) = \operatorname{top-k}_n\, q \cdot x_n`.

Modules, by responsibility:

* :mod:`.build` — chunked, resumable (SIGKILL-safe) embedding and assembly;
  :func:`build_synthetic_index` for CLI-scale checks.
* :mod:`.distributed` — the sharded build over a ``torch.distributed`` process group (each rank
  embeds ``chunk mod W == rank``; rank 0 assembles), with failures propagated to every rank.
* :mod:`.opened` — :class:`Index`: open + verify, records, the images they name, search.
* :mod:`.search` — ``ops.topk_similarity`` (exact), faiss ``IndexFlatIP`` / ``IndexIVFFlat``,
  multi-GPU sharding when faiss has several GPUs.
* :mod:`.flat` — :class:`FlatIndex`: an in-memory exact inner-product index used like
  ``faiss.IndexFlatIP`` (``add`` / ``search``), searched by ``ops.topk_similarity``.
* :mod:`.cost` — memory and search cost model at a given scale (the paper's index).
* ``python -m jomed_fast.index`` — ``build-synthetic``, ``verify`` (index files and every image's
  sha256), ``cost`` (also under torchrun).
"""

from __future__ import annotations

from .build import FILES, HEADS, build_index, synthetic_encoder, synthetic_records
from .cost import PAPER_INDEX, index_cost
from .flat import FlatIndex
from .opened import Index


def build_synthetic_index(
    n: int,
    encoder,
    out_dir,
    *,
    seed: int = 0,
    batch_size: int = 512,
    chunk_size: int = 8192,
    progress: bool = True,
    distributed=None,
) -> Index:
    """CLI-scale check: build an index of ``n`` synthetic records (records rendered lazily per access)."""
    return Index.build(
        synthetic_records(n, seed=seed),
        encoder,
        out_dir,
        batch_size=batch_size,
        chunk_size=chunk_size,
        progress=progress,
        distributed=distributed,
    )


__all__ = [
    "FILES",
    "FlatIndex",
    "HEADS",
    "PAPER_INDEX",
    "Index",
    "build_index",
    "build_synthetic_index",
    "index_cost",
    "synthetic_encoder",
    "synthetic_records",
]
