r"""Multimodal retrieval index: fp16 L2-normalised image/text embeddings ``[N, D]`` + manifest.

Layout of ``out_dir``: ``image_embeddings.npy``, ``text_embeddings.npy`` (fp16 ``[N, D]``),
``records.jsonl`` (``{id, image_path, text}``), ``manifest.json`` (count, dim, dtype, encoder
fingerprint, sha256 per file). During a build, ``chunks/`` holds one atomically written ``.npz``-free
pair of ``.npy`` files per chunk of ``chunk_size`` rows; a rerun skips finished chunks (resume).
Search: :math:`(\text{scores}, \text{ids}) = \operatorname{top-k}_n\, q \cdot x_n` via ``ops.topk_similarity``
or faiss ``IndexFlatIP`` (``IndexIVFFlat`` with ``nlist`` for large N).
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from jomed_fast._files import atomic_write_via, sha256_file

FILES = ("image_embeddings.npy", "text_embeddings.npy", "records.jsonl")
HEADS = {"image": "image_embeddings.npy", "text": "text_embeddings.npy"}


_sha256 = sha256_file


_atomic_write = atomic_write_via


def _save_npy(path: Path, arr: np.ndarray) -> None:
    def w(tmp):
        with open(tmp, "wb") as f:
            np.save(f, arr)
            f.flush()
            os.fsync(f.fileno())
    _atomic_write(path, w)


class Index:
    """An opened index; ``image`` / ``text`` are memory-mapped fp16 ``[N, D]`` arrays."""

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self.count, self.dim = manifest["count"], manifest["dim"]
        self.embeddings = {h: np.load(self.path / f, mmap_mode="r") for h, f in HEADS.items()}
        self._faiss = {}

    # ---------------------------------------------------------------- build
    @staticmethod
    def build(records: Sequence, encoder, out_dir, *, batch_size: int = 256, chunk_size: int = 1024,
              progress: bool = True) -> "Index":
        """Embed N records (image tower + text tower), write chunks, then assemble; resumable."""
        if batch_size < 1 or chunk_size < 1:
            raise ValueError(f"batch_size/chunk_size: expected >= 1, got {batch_size}/{chunk_size}")
        out = Path(out_dir)
        cdir = out / "chunks"
        cdir.mkdir(parents=True, exist_ok=True)
        fp = encoder.fingerprint()
        n = len(records)
        state = {"fingerprint": fp, "count": n, "chunk_size": chunk_size}
        prog = out / "build_progress.json"
        if prog.exists():
            old = json.loads(prog.read_text())
            if old != state:
                raise ValueError(f"{prog}: a build with different settings/encoder is in progress "
                                 f"({old}); remove {out} to start over")
        else:
            _atomic_write(prog, lambda p: Path(p).write_text(json.dumps(state)))
        n_chunks = (n + chunk_size - 1) // chunk_size
        was_training = getattr(encoder, "training", False)
        if hasattr(encoder, "eval"):
            encoder.eval()
        with tqdm(total=n, desc="index build", disable=not progress) as bar:
            for c in range(n_chunks):
                lo, hi = c * chunk_size, min(n, (c + 1) * chunk_size)
                ti = cdir / f"{c:06d}.text.npy"
                if ti.exists():  # image written first, text last: text present => chunk complete
                    bar.update(hi - lo)
                    continue
                ims, txs = [], []
                with torch.no_grad():
                    for s in range(lo, hi, batch_size):
                        batch = records[s: min(hi, s + batch_size)]
                        ims.append(encoder.encode_images([r.load_image() for r in batch]).float().cpu())
                        txs.append(encoder.encode_texts([r.text for r in batch]).float().cpu())
                        bar.update(len(batch))
                _save_npy(cdir / f"{c:06d}.image.npy", torch.cat(ims).numpy().astype(np.float16))
                _save_npy(ti, torch.cat(txs).numpy().astype(np.float16))
        if was_training:
            encoder.train()
        for head, fname in HEADS.items():
            parts = [np.load(cdir / f"{c:06d}.{head}.npy") for c in range(n_chunks)]
            _save_npy(out / fname, np.concatenate(parts) if parts else np.zeros((0, 0), np.float16))

        def wrec(tmp):
            with open(tmp, "w") as f:
                for r in records:
                    f.write(json.dumps({"id": r.id, "image_path": r.image_path, "text": r.text}) + "\n")
        _atomic_write(out / "records.jsonl", wrec)
        dim = int(np.load(out / "image_embeddings.npy", mmap_mode="r").shape[1]) if n else 0
        manifest = {"count": n, "dim": dim, "dtype": "float16", "encoder_fingerprint": fp,
                    "sha256": {f: _sha256(out / f) for f in FILES}}
        _atomic_write(out / "manifest.json", lambda p: Path(p).write_text(json.dumps(manifest, indent=1)))
        shutil.rmtree(cdir)
        prog.unlink()
        return Index(out, manifest)

    # ---------------------------------------------------------------- open
    @staticmethod
    def open(path, encoder=None, *, verify: bool = True) -> "Index":
        """Open and verify (manifest, sha256 of every file, shapes, encoder fingerprint)."""
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
            if verify and _sha256(fp) != m["sha256"].get(f):
                raise ValueError(f"{fp}: checksum mismatch with {mpath} (corrupt or modified file)")
        for f in HEADS.values():
            a = np.load(p / f, mmap_mode="r")
            if a.shape != (m["count"], m["dim"]) or a.dtype != np.float16:
                raise ValueError(f"{p / f}: expected float16 [{m['count']}, {m['dim']}], got {a.dtype} {list(a.shape)}")
        if encoder is not None and encoder.fingerprint() != m["encoder_fingerprint"]:
            raise ValueError(f"encoder: fingerprint {encoder.fingerprint()[:12]}… differs from the index's "
                             f"{m['encoder_fingerprint'][:12]}… ({mpath}); rebuild the index or use its encoder")
        return Index(p, m)

    def records(self) -> list[dict]:
        with open(self.path / "records.jsonl") as f:
            return [json.loads(line) for line in f]

    # ---------------------------------------------------------------- search
    def search(self, queries, k: int, head: str = "image", backend: str = "ops", nlist: Optional[int] = None,
               nprobe: int = 8):
        """Top-k of Q queries ``[Q, D]`` on one head -> (float32 scores ``[Q, k]``, int64 ids ``[Q, k]``).

        ``backend="ops"``: ``jomed_fast.ops.topk_similarity`` on the memory-mapped fp16 index (exact).
        ``backend="faiss"``: ``IndexFlatIP`` (exact, fp32 copy) or ``IndexIVFFlat`` when ``nlist`` is given.
        """
        if head not in HEADS:
            raise ValueError(f"head: expected 'image' or 'text', got {head!r}")
        q = torch.as_tensor(np.asarray(queries) if not isinstance(queries, torch.Tensor) else queries)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries: expected [Q, {self.dim}], got {list(q.shape)}")
        if not 1 <= k <= self.count:
            raise ValueError(f"k: expected 1 <= k <= {self.count}, got {k}")
        emb = self.embeddings[head]
        if backend == "ops":
            from jomed_fast.ops import topk_similarity
            with warnings.catch_warnings():  # read-only memmap: the op never writes to the index
                warnings.simplefilter("ignore", UserWarning)
                x = torch.from_numpy(emb)
            return topk_similarity(q.detach().float(), x, k)
        if backend != "faiss":
            raise ValueError(f"backend: expected 'ops' or 'faiss', got {backend!r}")
        import faiss
        key = (head, nlist)
        if key not in self._faiss:
            x = np.ascontiguousarray(emb, dtype=np.float32)
            if nlist is None:
                ix = faiss.IndexFlatIP(self.dim)
            else:
                ix = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
                ix.train(x)
            ix.add(x)
            self._faiss[key] = ix
        ix = self._faiss[key]
        if nlist is not None:
            ix.nprobe = nprobe
        qq = q.detach().to(torch.float16).float().numpy()  # rounded to the storage dtype, like ops
        d, i = ix.search(np.ascontiguousarray(qq), k)
        return torch.from_numpy(d), torch.from_numpy(i.astype(np.int64))


def build_synthetic_index(n: int, encoder, out_dir, *, seed: int = 0, batch_size: int = 512,
                          chunk_size: int = 8192, progress: bool = True) -> Index:
    """CLI-scale check: build an index of ``n`` synthetic records (records rendered lazily per access)."""
    from jomed_fast.data.synthetic import SyntheticGenerator

    gen = SyntheticGenerator(seed=seed, index_size=n)

    class _Lazy:
        def __len__(self):
            return n

        def __getitem__(self, sl):
            if isinstance(sl, slice):
                return [gen.index_record(i) for i in range(*sl.indices(n))]
            return gen.index_record(sl)

        def __iter__(self):
            return (gen.index_record(i) for i in range(n))

    return Index.build(_Lazy(), encoder, out_dir, batch_size=batch_size, chunk_size=chunk_size, progress=progress)
