"""The :class:`Index`: open and verify a built index, read its records, search one head."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from jomed_fast._checks import check_int
from jomed_fast._files import sha256_file

from .build import FILES, HEADS, build_index
from .cost import default_nlist
from .search import FaissSearcher, search_ops


class Index:
    """An opened index; ``embeddings[head]`` are memory-mapped fp16 ``[N, D]`` arrays.

    ``index.to(device)`` loads both heads onto ``device`` once (``2 N D`` fp16 bytes per head:
    3.24 GB each for the paper's 2.1M x 768) and exact search runs there from then on: queries are
    moved to that device (they stay where they are when already there) and scores and ids come back
    on it. On the CPU the heads stay memory-mapped (no copy), which is also the default.
    """

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        # where the rows' relative image paths start (an index built before rows were relative to
        # an image root holds absolute paths, or paths relative to its own folder)
        self.image_root = Path(os.path.normpath(self.path / manifest.get("image_root", ".")))
        self.manifest = manifest
        self.count, self.dim = manifest["count"], manifest["dim"]
        self.embeddings = {h: np.load(self.path / f, mmap_mode="r") for h, f in HEADS.items()}
        self._faiss: dict = {}
        self.device = torch.device("cpu")
        self._heads = {h: _memmap_tensor(a) for h, a in self.embeddings.items()}

    def to(self, device) -> Index:
        """Search on ``device`` from now on: the fp16 heads copied there once (on ``"cpu"``: the
        memory-mapped files again, no copy). Returns the index itself, as ``nn.Module.to`` does."""
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device: expected an available device, got {device} (torch sees no CUDA device)")
        if device != self.device:
            self._heads = {
                h: _memmap_tensor(a) if device.type == "cpu" else _memmap_tensor(a).to(device)
                for h, a in self.embeddings.items()
            }
            self.device = device
        return self

    def head(self, name: str) -> torch.Tensor:
        """One head's fp16 rows ``[N, D]`` where search runs (``self.device``)."""
        if name not in HEADS:
            raise ValueError(f"head: expected 'image' or 'text', got {name!r}")
        return self._heads[name]

    # ---------------------------------------------------------------- build
    @staticmethod
    def build(
        records: Sequence,
        encoder,
        out_dir,
        *,
        batch_size: int = 256,
        chunk_size: int = 1024,
        progress: bool = True,
        distributed: bool | None = None,
        image_root=None,
    ) -> Index:
        """Embed N records (image tower + text tower) in resumable chunks, then assemble.

        See :func:`jomed_fast.index.build.build_index`; with a torch.distributed process group of
        W > 1 ranks (or ``distributed=True``) each rank embeds its share of the chunks, rank 0
        assembles, and every rank returns the opened index.
        """
        manifest = build_index(
            records,
            encoder,
            out_dir,
            batch_size=batch_size,
            chunk_size=chunk_size,
            progress=progress,
            distributed=distributed,
            image_root=image_root,
        )
        return Index(Path(out_dir), manifest)

    # ---------------------------------------------------------------- open
    @staticmethod
    def open(path, encoder=None, *, verify: bool = True) -> Index:
        """Open and verify (manifest, sha256 of every file, shapes, encoder fingerprint). The image
        files the rows name are not read here (see :meth:`check_images`)."""
        p = Path(path)
        mpath = p / "manifest.json"
        if not mpath.is_file():
            raise ValueError(f"path: {mpath} not found (not a built index, or the build did not finish)")
        try:
            m = json.loads(mpath.read_text())
            for key in ("count", "dim", "dtype", "encoder_fingerprint", "sha256"):
                m[key]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{mpath}: malformed manifest ({e!r})") from None
        for f in FILES:
            fp = p / f
            if not fp.is_file():
                raise ValueError(f"{fp}: missing index file")
            if verify and sha256_file(fp) != m["sha256"].get(f):
                raise ValueError(f"{fp}: checksum mismatch with {mpath} (corrupt or modified file)")
        for f in HEADS.values():
            a = np.load(p / f, mmap_mode="r")
            if a.shape != (m["count"], m["dim"]) or a.dtype != np.float16:
                raise ValueError(f"{p / f}: expected float16 [{m['count']}, {m['dim']}], got {a.dtype} {list(a.shape)}")
        if encoder is not None and encoder.fingerprint() != m["encoder_fingerprint"]:
            raise ValueError(
                f"encoder: fingerprint {encoder.fingerprint()[:12]}… differs from the index's "
                f"{m['encoder_fingerprint'][:12]}… ({mpath}); rebuild the index or use its encoder"
            )
        return Index(p, m)

    def digest(self) -> str:
        """The index's content identity: its files' sha256 (from the verified manifest), shape and encoder."""
        from jomed_fast.identity import json_digest

        m = self.manifest
        return json_digest({k: m[k] for k in ("count", "dim", "dtype", "encoder_fingerprint", "sha256")})

    def records(self) -> list[dict]:
        """The rows of ``records.jsonl`` (``{id, image_path, text, image_sha256 | pixels_sha256}``)."""
        with open(self.path / "records.jsonl") as f:
            return [json.loads(line) for line in f]

    def image_path(self, row: dict, image_root=None) -> str | None:
        """A row's image file: its ``image_path`` resolved against ``image_root`` (default: the
        folder recorded at build time, :attr:`image_root`)."""
        path = row.get("image_path")
        if path is None:
            return None
        root = Path(image_root) if image_root is not None else self.image_root
        return os.path.normpath(path if os.path.isabs(path) else root / path)

    def check_images(self, image_root=None) -> dict:
        """Check every row's image file against the sha256 recorded at build time; returns
        ``{"checked": rows with a file digest, "unchecked": rows without one}``.

        Raises ``ValueError`` naming the first missing and the first changed image (and how many
        there are of each): what ``Index.open`` cannot see, as it reads the index's own files only.
        ``image_root``: where the images are now, when the data moved since the build.
        """
        from jomed_fast.identity import file_digest

        missing, changed, checked = [], [], 0
        for n, row in enumerate(self.records()):
            path = self.image_path(row, image_root)
            if path is None or "image_sha256" not in row:
                continue
            checked += 1
            if not os.path.isfile(path):
                missing.append(f"row {n} ({row['id']!r}): {path}")
            elif file_digest(path) != row["image_sha256"]:
                changed.append(f"row {n} ({row['id']!r}): {path}")
        problems = [
            f"{len(lst)} {what} (first: {lst[0]})"
            for lst, what in ((missing, "image(s) missing"), (changed, "image(s) changed since the build"))
            if lst
        ]
        if problems:
            raise ValueError(
                f"index {self.path}: {'; '.join(problems)}; restore them, give the folder they moved "
                "to (image_root), or rebuild the index"
            )
        return {"checked": checked, "unchecked": self.count - checked}

    # ---------------------------------------------------------------- search
    def search(
        self,
        queries,
        k: int,
        head: str = "image",
        backend: str = "ops",
        nlist: int | str | None = None,
        nprobe: int = 8,
    ):
        """Top-k of Q queries ``[Q, D]`` on one head -> (float32 scores ``[Q, k]``, int64 ids ``[Q, k]``).

        ``backend="ops"``: ``jomed_fast.ops.topk_similarity`` (exact) on the heads where they live
        (``to``): the memory-mapped files, or a copy on the GPU; the results on that device.
        ``backend="faiss"``: ``IndexFlatIP`` (exact, fp32 copy) or ``IndexIVFFlat`` when ``nlist`` is
        given (``"auto"``: a power of two near 4 sqrt(N); ``nprobe`` lists scanned per query);
        sharded over all GPUs when faiss sees several.
        The faiss index is built on first use and cached per (head, nlist). See
        :mod:`jomed_fast.index.search`.
        """
        if head not in HEADS:
            raise ValueError(f"head: expected 'image' or 'text', got {head!r}")
        q = torch.as_tensor(np.asarray(queries) if not isinstance(queries, torch.Tensor) else queries)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries: expected [Q, {self.dim}], got {list(q.shape)}")
        check_int("k", k, 1, self.count, expected=f"an int with 1 <= k <= {self.count}")
        emb = self.embeddings[head]
        if backend == "ops":
            return search_ops(self._heads[head], q.to(self.device), k)
        if backend != "faiss":
            raise ValueError(f"backend: expected 'ops' or 'faiss', got {backend!r}")
        lists = default_nlist(self.count) if nlist == "auto" else nlist
        if isinstance(lists, str):
            raise ValueError(f"nlist: expected an int, 'auto' or None, got {lists!r}")
        key = (head, lists)
        if key not in self._faiss:
            self._faiss[key] = FaissSearcher(emb, lists)
        return self._faiss[key].search(q, k, nprobe=nprobe)


def _memmap_tensor(a: np.ndarray) -> torch.Tensor:
    """A read-only memory-mapped array as a tensor over the same pages (no copy); the op never
    writes to the index, so torch's warning about non-writable arrays does not apply."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)
