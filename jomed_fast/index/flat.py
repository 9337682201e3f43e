r"""``FlatIndex``: an exact inner-product index used like ``faiss.IndexFlatIP``, searched by the fused top-k.

Rows ``x`` ``[N, D]`` are appended with ``add`` and stored contiguous in fp16 (the default, the
project's index storage) or fp32; ``search(q, k)`` returns for each query ``q_i`` of ``q`` ``[Q, D]``

.. math:: (D_i, I_i) = \operatorname{top\text{-}k}_{n < N}\; \mathrm{st}(q_i) \cdot x_n

with ``st`` the rounding to the storage dtype and fp32 accumulation: ``jomed_fast.ops.topk_similarity``,
so CUDA indexes run the Triton kernel (the ``[Q, N]`` score matrix is never stored) and CPU ones the
chunked torch path; ``JOMED_FAST_BACKEND`` selects as for the op.

**As faiss.** NumPy queries give NumPy results (float32 ``D``, int64 ``I``), torch queries give
torch tensors on the index's device. Scores are sorted descending; when ``k > ntotal`` the last
``k - ntotal`` columns are faiss's padding: ``D = -FLT_MAX`` (``-3.4028235e38``, not ``-inf``),
``I = -1``. Queries must be 2-D ``[Q, D]`` (one query is ``q.reshape(1, -1)``).

**Where it differs from faiss**, each time following the op's contract
(``jomed_fast/ops/topk_similarity.py``):

* equal scores are ordered by the lower id (faiss leaves their order to its heap);
* a stored NaN row ranks first with score NaN for every query, and a NaN query gets k NaN scores
  with ids ``0..k-1`` (faiss never returns a NaN score: it skips such rows, padding with ``-1``), so
  a damaged embedding shows in the results instead of vanishing from them. Rows are stored as given,
  infinities included; a finite value that rounding to fp16 would turn into an infinity is refused
  (``|v| >= 65520``: the row would rank by an overflow it did not have; store such rows in fp32);
* errors instead of faiss's assertions: a bad ``d`` on ``add`` / ``search``, ``k < 1`` or
  ``k > 1024`` (the op's largest k), and searching an empty index (faiss answers it with padding
  only) are ``ValueError`` / ``TypeError`` naming the argument;
* no gradient: the outputs are a selection. To train through the scores, recompute them for the
  returned ids: ``(q[:, None, :] * index.vectors[I]).sum(-1)``.

**Files.** ``save(path)`` writes a directory atomically (``jomed_fast._files``): ``vectors.safetensors``
(the ``[N, D]`` rows; metadata: format, d, dtype) and the project's sha256 manifest
``jomed_manifest.json`` (``jomed_fast._manifest``). ``FlatIndex.load(path)`` verifies every file
against the manifest first and refuses a damaged one with a one-line ``CorruptFile`` naming it.
"""

from __future__ import annotations

import operator
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from .._checks import check_int
from .._files import replace_dir_atomically
from .._manifest import CorruptFile, verify_dir

__all__ = ["FlatIndex"]

FORMAT = "jomed-flat-index-v1"
VECTORS_FILE = "vectors.safetensors"
_VECTORS_KEY = "vectors"
STORAGE_DTYPES = {torch.float16: "float16", torch.float32: "float32"}
MAX_K = 1024  # the op's largest k (jomed_fast.ops.topk_similarity.MAX_K)
# faiss's padding for the columns past ntotal: the lowest float32 and id -1 (faiss-cpu 1.15 returns these).
PAD_SCORE = float(np.finfo(np.float32).min)
PAD_ID = -1
# Smallest magnitude that float16 rounds to infinity (round to nearest even: 65504 + half a step of 32).
_FP16_OVERFLOW = 65520.0


def _as_tensor(name: str, value, what: str) -> torch.Tensor:
    """A NumPy array or torch tensor of floats as a detached torch tensor (NumPy: shares its memory)."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name}: expected a floating tensor {what}, got dtype {value.dtype}")
        return value.detach()
    if isinstance(value, np.ndarray):
        if value.dtype.kind != "f":
            raise TypeError(f"{name}: expected a floating array {what}, got dtype {value.dtype}")
        if value.dtype not in (np.float16, np.float32, np.float64):  # float128: torch has none
            value = value.astype(np.float64)
        with warnings.catch_warnings():  # read-only arrays (memmaps): nothing here writes to them
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(np.ascontiguousarray(value))
    raise TypeError(f"{name}: expected a numpy.ndarray or torch.Tensor {what}, got {type(value).__name__}")


def _check_k(k) -> int:
    """An int (NumPy integers too, as faiss takes them; never a bool) in 1..MAX_K."""
    if isinstance(k, (bool, np.bool_)):
        raise TypeError(f"k: expected an int, got {k!r}")
    try:
        k = operator.index(k)
    except TypeError:
        raise TypeError(f"k: expected an int, got {type(k).__name__}") from None
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k: expected 1 <= k <= {MAX_K}, got {k}")
    return k


class FlatIndex:
    """Exact inner-product index of ``d``-dimensional rows stored in ``dtype`` on ``device``.

    ``add(x)``, ``search(q, k) -> (D, I)``, ``ntotal``, ``d`` and ``reset()`` as ``faiss.IndexFlatIP``;
    ``to(device)``, ``save(path)`` / ``FlatIndex.load(path)``; ``vectors`` is the stored ``[ntotal, d]``.
    """

    def __init__(self, d: int, dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu"):
        self._d = check_int("d", d, 1)
        if dtype not in STORAGE_DTYPES:
            raise TypeError(f"dtype: expected torch.float16 or torch.float32, got {dtype!r}")
        # Rows live in the first ``_ntotal`` rows of a buffer that grows by doubling, so n adds of
        # a few rows each cost O(total rows) copies, as faiss's std::vector does.
        self._buffer = torch.empty((0, self._d), dtype=dtype, device=device)
        self._ntotal = 0

    @property
    def d(self) -> int:
        return self._d

    @property
    def ntotal(self) -> int:
        return self._ntotal

    @property
    def dtype(self) -> torch.dtype:
        return self._buffer.dtype

    @property
    def device(self) -> torch.device:
        return self._buffer.device

    @property
    def vectors(self) -> torch.Tensor:
        """The stored rows ``[ntotal, d]`` (a contiguous view of the storage: read it, do not write it)."""
        return self._buffer[: self._ntotal]

    def __repr__(self) -> str:
        return f"FlatIndex(d={self.d}, ntotal={self.ntotal}, dtype={self.dtype}, device={str(self.device)!r})"

    def add(self, x) -> None:
        """Append the rows of ``x`` ``[N, d]`` (NumPy or torch, any float dtype, any device), stored
        in the index's dtype on its device."""
        rows = _as_tensor("x", x, f"[N, {self.d}]")
        if rows.dim() != 2 or rows.shape[1] != self.d:
            raise ValueError(f"x: expected a 2-D array [N, {self.d}] (d = {self.d}), got shape {tuple(rows.shape)}")
        rows = rows.to(self.device)
        stored = rows.to(self.dtype)
        if self.dtype == torch.float16:
            overflow = torch.isfinite(rows) & (rows.abs() >= _FP16_OVERFLOW)
            if bool(overflow.any()):
                row = int(overflow.any(dim=1).nonzero()[0, 0])
                raise ValueError(
                    f"x: expected values float16 can hold (|v| < {_FP16_OVERFLOW:g}), got "
                    f"{float(rows[overflow][0]):g} in row {row}; use FlatIndex(d, dtype=torch.float32)"
                )
        n = stored.shape[0]
        needed = self._ntotal + n
        if needed > self._buffer.shape[0]:
            grown = torch.empty((max(needed, 2 * self._buffer.shape[0]), self.d), dtype=self.dtype, device=self.device)
            grown[: self._ntotal] = self.vectors
            self._buffer = grown
        self._buffer[self._ntotal : needed] = stored
        self._ntotal = needed

    def reset(self) -> None:
        """Remove every row (and free their storage)."""
        self._buffer = self._buffer.new_empty((0, self.d))
        self._ntotal = 0

    def search(self, q, k: int):
        """Top-k inner products of the queries ``q`` ``[Q, d]`` -> ``(D, I)`` ``[Q, k]`` each.

        NumPy in: NumPy out (float32 ``D``, int64 ``I``); torch in: torch out on the index's device.
        Past ``ntotal`` the columns hold faiss's padding (``D = -FLT_MAX``, ``I = -1``).
        """
        queries = _as_tensor("q", q, f"[Q, {self.d}]")
        if queries.dim() != 2 or queries.shape[1] != self.d:
            hint = " (one query: q.reshape(1, -1))" if queries.dim() == 1 else ""
            raise ValueError(
                f"q: expected a 2-D array [Q, {self.d}] (d = {self.d}), got shape {tuple(queries.shape)}{hint}"
            )
        k = _check_k(k)
        if self._ntotal == 0:
            raise ValueError("search: the index is empty (ntotal = 0); add rows before searching")
        from jomed_fast.ops import topk_similarity

        # The op casts queries to the storage dtype itself; doing it here also takes float64 queries.
        queries = queries.to(device=self.device, dtype=self.dtype)
        Q, found = queries.shape[0], min(k, self._ntotal)
        if Q == 0:
            scores = torch.empty((0, found), dtype=torch.float32, device=self.device)
            ids = torch.empty((0, found), dtype=torch.int64, device=self.device)
        else:
            scores, ids = topk_similarity(queries, self.vectors, found)
        if found < k:
            scores = torch.cat([scores, scores.new_full((Q, k - found), PAD_SCORE)], dim=1)
            ids = torch.cat([ids, ids.new_full((Q, k - found), PAD_ID)], dim=1)
        if isinstance(q, np.ndarray):
            return scores.cpu().numpy(), ids.cpu().numpy()
        return scores, ids

    def to(self, device: str | torch.device) -> FlatIndex:
        """This index on ``device`` (itself when it is there already, as ``Tensor.to``)."""
        vectors = self.vectors
        moved = vectors.to(device)
        if moved is vectors:
            return self
        other = FlatIndex(self.d, self.dtype, moved.device)
        other._buffer, other._ntotal = moved.contiguous(), self._ntotal
        return other

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to the directory ``path`` atomically (``vectors.safetensors`` + manifest)."""
        from safetensors.torch import save_file

        vectors = self.vectors.detach().cpu().clone()  # its own storage: safetensors refuses shared views
        metadata = {"format": FORMAT, "d": str(self.d), "dtype": STORAGE_DTYPES[self.dtype]}

        def fill(tmp: Path) -> None:
            save_file({_VECTORS_KEY: vectors}, str(tmp / VECTORS_FILE), metadata=metadata)
            with open(tmp / VECTORS_FILE, "rb") as f:
                os.fsync(f.fileno())

        return replace_dir_atomically(path, fill)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> FlatIndex:
        """Open a directory written by :meth:`save` onto ``device``, every file checked against its
        sha256 manifest first; a damaged or foreign file is a one-line ``CorruptFile`` naming it."""
        from safetensors import SafetensorError, safe_open

        root = Path(path)
        if not root.is_dir():
            raise ValueError(f"path: expected a directory written by FlatIndex.save, got {str(root)!r}")
        verify_dir(root, required=True)
        file = root / VECTORS_FILE
        if not file.is_file():
            raise CorruptFile(f"{file}: missing; {root} is not a FlatIndex directory")
        try:
            with safe_open(str(file), framework="pt", device=str(torch.device(device))) as f:
                metadata = f.metadata() or {}
                keys = list(f.keys())
                vectors = f.get_tensor(_VECTORS_KEY) if keys == [_VECTORS_KEY] else None
        except SafetensorError as exc:
            raise CorruptFile(f"{file}: unreadable safetensors file ({exc})") from exc
        dtype = {name: dt for dt, name in STORAGE_DTYPES.items()}.get(metadata.get("dtype", ""))
        d = metadata.get("d", "")
        if (
            metadata.get("format") != FORMAT
            or vectors is None
            or dtype is None
            or vectors.dtype != dtype
            or not d.isdigit()
            or int(d) < 1
            or vectors.dim() != 2
            or vectors.shape[1] != int(d)
        ):
            raise CorruptFile(
                f"{file}: expected a {FORMAT} file (one tensor {_VECTORS_KEY!r} [N, d] in float16 or float32), "
                f"got metadata {metadata} and tensors {keys}"
            )
        index = cls(int(d), dtype, vectors.device)
        index._buffer, index._ntotal = vectors.contiguous(), vectors.shape[0]
        return index
