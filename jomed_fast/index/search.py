r"""Index search backends: exact top-k via ``ops.topk_similarity``, or faiss (flat / IVF / multi-GPU).

For Q queries :math:`q \in \mathbb{R}^{Q\times D}` and one head :math:`X \in \mathbb{R}^{N\times D}`
(fp16, rows L2-normalised), search returns per query the k rows with the largest inner product

.. math:: (\text{scores}, \text{ids}) = \operatorname{top-k}_{n < N}\; \mathrm{fp16}(q) \cdot X_n

as float32 scores ``[Q, k]`` (descending) and int64 ids ``[Q, k]``.

* ``ops``: exact, on the memory-mapped fp16 array (no copy) or its copy on a GPU (``Index.to``),
  ties by the lower id.
* faiss ``IndexFlatIP``: exact, on an fp32 copy (2x the fp16 bytes) filled in row blocks.
* faiss ``IndexIVFFlat`` (``nlist`` lists, k-means on a sample of ``min(N, 256 nlist)`` rows):
  approximate; each query scans the ``nprobe`` lists nearest to it, about
  :math:`N \cdot nprobe / nlist` rows, instead of N. ``nprobe = nlist`` is exact.
* several GPUs visible to faiss (``faiss.get_num_gpus() > 1``, faiss-gpu builds only): the
  populated CPU index is cloned onto all of them with ``index_cpu_to_all_gpus`` and
  ``GpuMultipleClonerOptions.shard = True``, so each GPU holds N/G rows (flat) or the rows
  ``id mod G`` of every list (IVF) and the shards' top-k are merged by faiss. Stored as fp16 on
  the GPUs (``useFloat16``), which loses nothing: the index is fp16 already.

faiss is optional (the extras ``[faiss-cpu]`` and ``[faiss-gpu]``, alternatives: both install the
module ``faiss``); without it the faiss backend raises ``MissingDependency`` naming them.
"""

from __future__ import annotations

import numpy as np
import torch

from .._checks import check_int
from .._extras import require

ADD_BLOCK = 1 << 16  # rows converted to fp32 and added to faiss at a time


def search_ops(x: torch.Tensor, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of ``q`` ``[Q, D]`` over the fp16 head ``x`` ``[N, D]`` with ``ops.topk_similarity``,
    on the device both are on."""
    from jomed_fast.ops import topk_similarity

    return topk_similarity(q.detach().float(), x, k)


def _faiss():
    """faiss, from either extra: faiss-cpu and faiss-gpu install the same module, so they are
    alternatives and neither is a hard dependency (``ops.topk_similarity`` serves exact search)."""
    return require("faiss", ("faiss-cpu", "faiss-gpu"), "backend='faiss' (IndexFlatIP / IndexIVFFlat)")


def faiss_gpu_count() -> int:
    """GPUs faiss can use (0 with faiss-cpu)."""
    faiss = _faiss()
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def _to_all_gpus_sharded(ix):
    """Shard a populated CPU faiss index over every GPU faiss sees. Needs faiss-gpu and >1 GPU.

    Not exercised by the tests (no GPU on the CI machine): it is the documented faiss path
    (``GpuMultipleClonerOptions.shard``; IndexFlat shards keep successive ids, IVF shards keep the
    stored ids), taken only when :func:`faiss_gpu_count` is above 1.
    """
    faiss = _faiss()
    co = faiss.GpuMultipleClonerOptions()
    co.shard = True
    co.useFloat16 = True
    return faiss.index_cpu_to_all_gpus(ix, co=co)


class FaissSearcher:
    """A faiss index over one fp16 head ``[N, D]``: flat (``nlist=None``) or IVF with ``nlist`` lists.

    ``gpus``: ``None`` shards over all GPUs when faiss sees more than one, ``False`` stays on CPU.
    The fp16 rows are converted to fp32 ``ADD_BLOCK`` rows at a time (no second full copy).
    """

    def __init__(
        self,
        emb: np.ndarray,
        nlist: int | None = None,
        *,
        gpus: bool | None = None,
        train_per_list: int = 256,
        seed: int = 0,
    ):
        faiss = _faiss()

        if emb.ndim != 2:
            raise ValueError(f"emb: expected [N, D], got shape {list(emb.shape)}")
        n, d = emb.shape
        check_int("nlist", nlist, 1, n, optional=True, expected=f"an int in 1..N = {n} (or None for exact search)")
        self.nlist, self.dim = nlist, d
        if nlist is None:
            ix = faiss.IndexFlatIP(d)
        else:
            self._quantizer = faiss.IndexFlatIP(d)  # kept alive: the IVF index borrows it
            ix = faiss.IndexIVFFlat(self._quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            m = min(n, train_per_list * nlist)
            rows = np.sort(np.random.default_rng(seed).choice(n, m, replace=False)) if m < n else np.arange(n)
            ix.train(np.ascontiguousarray(emb[rows], dtype=np.float32))
        for lo in range(0, n, ADD_BLOCK):
            ix.add(np.ascontiguousarray(emb[lo : lo + ADD_BLOCK], dtype=np.float32))
        self.on_gpus = False
        if gpus is not False and faiss_gpu_count() > 1:
            ix = _to_all_gpus_sharded(ix)
            self.on_gpus = True
        self.index = ix

    def search(self, q: torch.Tensor, k: int, nprobe: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k of ``q`` ``[Q, D]`` (rounded to fp16 first, as the ops path does)."""
        faiss = _faiss()

        if self.nlist is not None:
            nprobe = min(check_int("nprobe", nprobe, 1), self.nlist)
            if self.on_gpus:
                faiss.GpuParameterSpace().set_index_parameter(self.index, "nprobe", nprobe)
            else:
                self.index.nprobe = nprobe
        qq = q.detach().to(torch.float16).float().numpy()
        d, i = self.index.search(np.ascontiguousarray(qq), k)
        return torch.from_numpy(d), torch.from_numpy(i.astype(np.int64))
