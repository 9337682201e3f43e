r"""Index build: embed N records with both towers in chunks, then assemble; resumable, shardable.

For records :math:`r_n = (i_n, t_n)`, :math:`n < N`, and an encoder with image/text towers
:math:`f_I, f_T` returning L2-normalised ``[*, D]`` rows, the build writes

.. math:: X_I[n] = \mathrm{fp16}(f_I(i_n)),\qquad X_T[n] = \mathrm{fp16}(f_T(t_n)),\qquad X \in \mathbb{R}^{N\times D}.

Each record is stored as a row of ``records.jsonl``: ``{id, image_path, text, image_sha256}`` --
``image_path`` relative to the image root (the records file's folder for records read by
``load_index_records``; the manifest's ``image_root`` locates it relative to the index folder),
``image_sha256`` the image file's sha256 (``pixels_sha256`` of the pixels for a record held in
memory). What stays true when the data moves, then, and what lets ``Index.check_images`` say that
an image changed or is gone.

Chunk :math:`c` holds rows :math:`[c\,S, \min(N, (c+1)S))` for ``chunk_size`` S and is three atomically
written files in ``out_dir/chunks``: ``c.image.npy``, ``c.records.jsonl``, ``c.text.npy`` (written in
that order, so a present ``.text.npy`` marks a finished chunk). A rerun keeps a finished chunk only
when its stored rows equal the rows of the records given now (ids, captions, image digests, paths),
so a resume is keyed by content: records edited between a kill and the rerun get their chunks
embedded again (a warning names them) and the rest is kept. Per-chunk rows rather than one digest of
all records because an edit then costs only the chunks it touches, and the check needs no state
beyond the chunk's own files. A build killed at any point (SIGKILL included) resumes where it stopped
and ends byte-identical to an uninterrupted one. ``build_progress.json`` pins what every chunk
depends on besides its records (the encoder's fingerprint, S, the chunk format); a rerun with
another is refused, naming what changed. The batch size is not pinned (it does not change rows).

Sharded build (``torch.distributed``, see :mod:`jomed_fast.index.distributed`): with W ranks, rank r
embeds the chunks with :math:`c \bmod W = r`; rank 0 then streams the chunks into the final files
(never more than one chunk in memory) and writes the manifest. The files do not depend on W.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from jomed_fast._checks import check_int
from jomed_fast._files import atomic_write_via, sha256_file
from jomed_fast.data.records import image_identity
from jomed_fast.identity import check_identity, read_identity

from .distributed import Group, resolve_group

logger = logging.getLogger(__name__)

FILES = ("image_embeddings.npy", "text_embeddings.npy", "records.jsonl")
HEADS = {"image": "image_embeddings.npy", "text": "text_embeddings.npy"}
BUILD_FORMAT = 3  # chunk layout version, pinned in build_progress.json (3: rows carry image digests)


def save_npy(path: Path, arr: np.ndarray) -> None:
    """``np.save`` to a temporary sibling, fsync, rename."""

    def w(tmp):
        with open(tmp, "wb") as f:
            np.save(f, arr)
            f.flush()
            os.fsync(f.fileno())

    atomic_write_via(path, w)


def relative_posix(path, root: Path) -> str:
    """``path`` relative to ``root``, with ``/`` (absolute where no relative path exists: another drive)."""
    try:
        return os.path.relpath(os.path.abspath(path), root).replace(os.sep, "/")
    except ValueError:
        return os.path.abspath(path)


def record_row(r, image_root: Path) -> dict:
    """The ``records.jsonl`` row of record ``r`` (see the module docstring)."""
    path = None if r.image_path is None else relative_posix(r.image_path, image_root)
    return {"id": r.id, "image_path": path, "text": r.text, **image_identity(r)}


def _record_line(r, image_root: Path) -> str:
    return json.dumps(record_row(r, image_root)) + "\n"


def _chunk_rows(c: int, n: int, chunk_size: int) -> tuple[int, int]:
    return c * chunk_size, min(n, (c + 1) * chunk_size)


def _chunk_lines(records, lo: int, hi: int, batch_size: int, root: Path) -> str:
    return "".join(
        _record_line(r, root) for s in range(lo, hi, batch_size) for r in records[s : min(hi, s + batch_size)]
    )


def _finished_and_current(records, cdir: Path, c: int, lo: int, hi: int, batch_size: int, root: Path) -> bool | None:
    """True: chunk ``c`` is finished and was embedded from these records; None: it is not finished;
    False: it was embedded from other records (its marker is removed first, so a kill while it is
    embedded again leaves it unfinished, never a mix)."""
    marker = cdir / f"{c:06d}.text.npy"
    if not marker.exists():
        return None
    stored = cdir / f"{c:06d}.records.jsonl"
    if stored.is_file() and stored.read_text() == _chunk_lines(records, lo, hi, batch_size, root):
        return True
    marker.unlink()
    return False


def _embed_chunk(records, encoder, cdir: Path, c: int, lo: int, hi: int, batch_size: int, bar, root: Path) -> None:
    ims: list[torch.Tensor] = []
    txs: list[torch.Tensor] = []
    lines: list[str] = []
    with torch.no_grad():
        for s in range(lo, hi, batch_size):
            batch = records[s : min(hi, s + batch_size)]
            lines.extend(_record_line(r, root) for r in batch)  # first: a missing image file is named here
            ims.append(encoder.encode_images([r.load_image() for r in batch]).float().cpu())
            txs.append(encoder.encode_texts([r.text for r in batch]).float().cpu())
            bar.update(len(batch))
    save_npy(cdir / f"{c:06d}.image.npy", torch.cat(ims).numpy().astype(np.float16))
    atomic_write_via(cdir / f"{c:06d}.records.jsonl", lambda p: Path(p).write_text("".join(lines)))
    save_npy(cdir / f"{c:06d}.text.npy", torch.cat(txs).numpy().astype(np.float16))  # last: marks done


def _concat_npy(parts: list[Path], dest: Path, n: int, bar) -> int:
    """Stream fp16 chunk files ``[n_c, D]`` into one ``.npy`` ``[N, D]`` (same bytes as ``np.save``)."""
    if not parts:
        save_npy(dest, np.zeros((0, 0), np.float16))
        return 0
    dim = int(np.load(parts[0], mmap_mode="r").shape[1])

    def w(tmp):
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, dim))
        row = 0
        for p in parts:
            a = np.load(p, mmap_mode="r")
            if a.dtype != np.float16 or a.ndim != 2 or a.shape[1] != dim or row + a.shape[0] > n:
                raise ValueError(
                    f"{p}: expected a float16 chunk [<= {n - row}, {dim}], got {a.dtype} "
                    f"{list(a.shape)}; remove it and rerun the build to re-embed it"
                )
            out[row : row + a.shape[0]] = a
            row += a.shape[0]
            bar.update(a.shape[0])
        if row != n:
            raise ValueError(f"{dest.parent / 'chunks'}: expected {n} rows in the chunks, got {row}")
        out.flush()
        del out
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())

    atomic_write_via(dest, w)
    return dim


def _assemble(out: Path, cdir: Path, n: int, n_chunks: int, fingerprint: str, root: Path, progress: bool) -> dict:
    """Rank 0: chunks -> final files + manifest, then remove the chunks and the progress file."""
    with tqdm(total=2 * n, desc="index assemble", disable=not progress) as bar:
        dims = {
            h: _concat_npy([cdir / f"{c:06d}.{h}.npy" for c in range(n_chunks)], out / f, n, bar)
            for h, f in HEADS.items()
        }
    if dims["image"] != dims["text"]:
        raise ValueError(f"encoder: expected image and text towers of the same dim D, got {dims}")

    def wrec(tmp):
        with open(tmp, "wb") as f:
            for c in range(n_chunks):
                with open(cdir / f"{c:06d}.records.jsonl", "rb") as src:
                    shutil.copyfileobj(src, f)
            f.flush()
            os.fsync(f.fileno())

    atomic_write_via(out / "records.jsonl", wrec)
    manifest = {
        "count": n,
        "dim": dims["image"],
        "dtype": "float16",
        "encoder_fingerprint": fingerprint,
        "image_root": relative_posix(root, out),
        "sha256": {f: sha256_file(out / f) for f in FILES},
    }
    atomic_write_via(out / "manifest.json", lambda p: Path(p).write_text(json.dumps(manifest, indent=1)))
    shutil.rmtree(cdir)
    (out / "build_progress.json").unlink()
    return manifest


def _prepare(out: Path, cdir: Path, state: dict, g: Group) -> None:
    """Create the chunk folder and pin ``state`` in ``build_progress.json``, or refuse a build in
    progress that was started with another encoder, chunk size or chunk format."""
    cdir.mkdir(parents=True, exist_ok=True)
    prog = out / "build_progress.json"
    old = read_identity(prog)
    if old is not None:
        check_identity(old, state, f"out_dir: the index build in progress in {out}")
    elif g.rank == 0:  # the others see it absent or complete (atomic), and it equals their state
        atomic_write_via(prog, lambda p: Path(p).write_text(json.dumps(state)))


def _embed_mine(
    records, encoder, out: Path, chunks: list[int], n: int, chunk_size: int, batch_size: int, root: Path, bar
) -> list[int]:
    """Embed this rank's chunks that are not finished from these records; returns the chunks that
    had been embedded from other records."""
    cdir = out / "chunks"
    redone = []
    for c in chunks:
        lo, hi = _chunk_rows(c, n, chunk_size)
        done = _finished_and_current(records, cdir, c, lo, hi, batch_size, root)
        if done:  # finished before a kill, from the same records: keep
            bar.update(hi - lo)
            continue
        if done is False:
            redone.append(c)
        _embed_chunk(records, encoder, cdir, c, lo, hi, batch_size, bar, root)
    if redone:
        logger.warning(
            "%s: the records of chunk(s) %s changed (ids, captions, images or paths) since they "
            "were embedded; embedded them again",
            out,
            redone,
        )
    return redone


def build_index(
    records: Sequence,
    encoder,
    out_dir,
    *,
    batch_size: int = 256,
    chunk_size: int = 1024,
    progress: bool = True,
    distributed: bool | None = None,
    image_root=None,
) -> dict:
    """Embed and write the index (see the module docstring); returns the manifest.

    ``records``: a sequence of N >= 1 records (``.id``, ``.image_path``, ``.text``, ``.image``,
    ``.load_image()``) supporting ``len`` and slicing; ``encoder``: ``encode_images``/``encode_texts``
    -> ``[B, D]`` and ``fingerprint()``. ``image_root``: the folder stored image paths are relative
    to (default: ``records.image_root`` for records read by ``load_index_records``, i.e. the records
    file's folder; else the index folder). ``distributed``: ``None`` shards over the default process
    group when one with several ranks is initialised, ``True`` requires one, ``False`` never shards.
    Every rank must pass the same records, encoder and settings (checked: fingerprints, N, S).
    """
    check_int("batch_size", batch_size, 1)
    check_int("chunk_size", chunk_size, 1)
    n = len(records)
    if n == 0:
        raise ValueError("records: expected at least one record to index, got 0")
    g: Group = resolve_group(distributed)
    out = Path(os.path.abspath(out_dir))
    cdir = out / "chunks"
    root = Path(os.path.abspath(image_root if image_root is not None else getattr(records, "image_root", None) or out))
    fp = encoder.fingerprint()
    state = {"format": BUILD_FORMAT, "encoder": fp, "chunk_size": chunk_size}
    g.check_same(
        "build settings (encoder fingerprint, record count, chunk_size)",
        json.dumps({**state, "count": n}, sort_keys=True),
    )
    g.run_all(lambda: _prepare(out, cdir, state, g), "index build: prepare")

    n_chunks = (n + chunk_size - 1) // chunk_size
    mine = [c for c in range(n_chunks) if c % g.world == g.rank]

    def embed():
        was_training = getattr(encoder, "training", False)
        if hasattr(encoder, "eval"):
            encoder.eval()
        desc = "index build" if g.world == 1 else f"index build (rank {g.rank}/{g.world})"
        rows = sum(hi - lo for lo, hi in (_chunk_rows(c, n, chunk_size) for c in mine))
        try:
            with tqdm(total=rows, desc=desc, disable=not progress or g.rank != 0) as bar:
                _embed_mine(records, encoder, out, mine, n, chunk_size, batch_size, root, bar)
        finally:
            if was_training:
                encoder.train()

    g.run_all(embed, "index build: embedding")  # all-reduce: every rank's chunks are on disk after it

    manifest = g.run_all(
        lambda: _assemble(out, cdir, n, n_chunks, fp, root, progress) if g.rank == 0 else None, "index build: assembly"
    )
    if manifest is None:
        manifest = json.loads((out / "manifest.json").read_text())
    return manifest


class _LazySynthetic(Sequence):
    """The N index records of a synthetic generator, rendered on access (nothing held in memory)."""

    def __init__(self, gen, n: int):
        self.gen, self.n = gen, n

    def __len__(self):
        return self.n

    def __getitem__(self, sl):
        if isinstance(sl, slice):
            return [self.gen.index_record(i) for i in range(*sl.indices(self.n))]
        return self.gen.index_record(sl)

    def __iter__(self):
        return (self.gen.index_record(i) for i in range(self.n))


def synthetic_records(n: int, *, seed: int = 0) -> _LazySynthetic:
    """The index records ``syn-idx-0..n-1`` of ``SyntheticGenerator(seed=seed, index_size=n)``, lazily."""
    from jomed_fast.data.synthetic import SyntheticGenerator

    check_int("n", n, 1)
    return _LazySynthetic(SyntheticGenerator(seed=seed, index_size=n), n)


def synthetic_encoder(*, seed: int = 0, **config):
    """A deterministic untrained TinyCLIP (``config``: TinyConfig fields) whose vocabulary covers the
    synthetic captions; the same weights on every rank, so the fingerprints agree."""
    from jomed_fast.data.synthetic.captions import caption_vocabulary
    from jomed_fast.retriever import TinyCLIP

    return TinyCLIP.from_captions(caption_vocabulary(), seed=seed, **config)
