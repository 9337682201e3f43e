"""``python -m jomed_fast.index``: build a synthetic index (one process or sharded), verify, cost.

    python -m jomed_fast.index build-synthetic --records 100000 --out runs/ix100k
    torchrun --nproc-per-node 2 -m jomed_fast.index build-synthetic --records 100000 --out runs/ix100k
    python -m jomed_fast.index verify runs/ix100k --encoder runs/ix100k/encoder   # + every image's sha256
    python -m jomed_fast.index cost            # the paper's index: memory and search floors

Under torchrun (``WORLD_SIZE`` > 1 in the environment) the default process group is initialised
(gloo, or NCCL with ``--backend nccl``) and each rank embeds its share of the chunks; rerunning the
same command after a kill resumes. Without ``--encoder`` the build uses a deterministic untrained
TinyCLIP (same on every rank) and saves it to ``OUT/encoder``. Errors: one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from jomed_fast.index.distributed import RankFailed


def _positive(name: str, v: int) -> int:
    if v < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {v}")
    return v


def _init_distributed(backend: str) -> bool:
    """Initialise the default process group from torchrun's environment; True if this call did."""
    world = os.environ.get("WORLD_SIZE", "1")
    if not world.isdigit() or int(world) < 1:
        raise ValueError(f"WORLD_SIZE: expected an int >= 1 (set by torchrun), got {world!r}")
    import torch
    import torch.distributed as dist
    if int(world) == 1 or dist.is_initialized():
        return False
    if backend == "auto":
        backend = "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def _build_synthetic(a) -> dict:
    import torch

    from jomed_fast.index import build_synthetic_index, synthetic_encoder
    from jomed_fast.retriever import TinyCLIP

    for name in ("records", "chunk_size", "batch_size", "width", "depth", "dim", "threads"):
        _positive("--" + name.replace("_", "-"), getattr(a, name))
    torch.set_num_threads(a.threads)
    if a.encoder is not None:
        enc = TinyCLIP.load(a.encoder)
    else:
        enc = synthetic_encoder(seed=a.seed, width=a.width, depth=a.depth, dim=a.dim)
    t0 = time.perf_counter()
    ix = build_synthetic_index(a.records, enc, a.out, seed=a.seed, batch_size=a.batch_size, chunk_size=a.chunk_size,
                               progress=not a.no_progress)
    seconds = time.perf_counter() - t0
    import torch.distributed as dist
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if a.encoder is None and rank == 0:
        enc.save(Path(a.out) / "encoder")
    return {"out": str(a.out), "count": ix.count, "dim": ix.dim, "seconds": round(seconds, 3), "world": world,
            "rank": rank, "sha256": ix.manifest["sha256"]}


def _verify(a) -> dict:
    from jomed_fast.index import Index
    from jomed_fast.retriever import TinyCLIP

    t0 = time.perf_counter()
    ix = Index.open(a.path, encoder=TinyCLIP.load(a.encoder) if a.encoder else None)
    images = None if a.no_images else ix.check_images(a.image_root)
    return {"path": str(a.path), "count": ix.count, "dim": ix.dim, "ok": True, "images": images,
            "seconds": round(time.perf_counter() - t0, 3)}


def _cost(a) -> dict | None:
    from jomed_fast.index.cost import cost_markdown, index_cost

    for name in ("records", "dim", "nlist", "nprobe", "k"):
        if getattr(a, name) is not None:
            _positive("--" + name, getattr(a, name))
    c = index_cost(a.records, a.dim, nlist=a.nlist, nprobe=a.nprobe, k=a.k)
    if a.json:
        return c
    print(cost_markdown(c))
    return None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jomed_fast.index", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-synthetic", help="build an index of N synthetic records (resumable; torchrun-aware)")
    b.add_argument("--records", type=int, required=True, help="number of synthetic index records N")
    b.add_argument("--out", type=Path, required=True, help="index directory (rerun to resume)")
    b.add_argument("--chunk-size", type=int, default=8192, help="rows per resumable chunk (default 8192)")
    b.add_argument("--batch-size", type=int, default=512, help="rows per encoder call (default 512)")
    b.add_argument("--seed", type=int, default=0, help="synthetic data (and default encoder) seed")
    b.add_argument("--encoder", type=Path, default=None, help="a saved TinyCLIP directory (default: built in code)")
    b.add_argument("--width", type=int, default=32, help="default encoder's conv width")
    b.add_argument("--depth", type=int, default=4, help="default encoder's residual blocks")
    b.add_argument("--dim", type=int, default=64, help="default encoder's embedding dim D")
    b.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // int(os.environ.get("WORLD_SIZE", "1") or 1)),
                   help="torch CPU threads per process (default: cores / WORLD_SIZE)")
    b.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto", help="process-group backend under torchrun")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    v = sub.add_parser("verify", help="open an index and check every checksum, the images it names (and the encoder)")
    v.add_argument("path", type=Path)
    v.add_argument("--encoder", type=Path, default=None, help="TinyCLIP directory whose fingerprint must match")
    v.add_argument("--image-root", type=Path, default=None,
                   help="where the record images are now (default: the folder recorded at build time)")
    v.add_argument("--no-images", action="store_true",
                   help="skip reading every image file against its recorded sha256 (the index's own files only)")
    c = sub.add_parser("cost", help="memory and search-cost floors (default: the paper's index)")
    c.add_argument("--records", type=int, default=None, help="rows N (default: PMC-OA + ROCO + MIMIC-CXR)")
    c.add_argument("--dim", type=int, default=768)
    c.add_argument("--nlist", type=int, default=None)
    c.add_argument("--nprobe", type=int, default=32)
    c.add_argument("--k", type=int, default=10)
    c.add_argument("--json", action="store_true", help="print the JSON model instead of the table")
    a = p.parse_args(argv)
    started = False
    try:
        if a.cmd == "build-synthetic":
            started = _init_distributed(a.backend)
            result = _build_synthetic(a)
        elif a.cmd == "verify":
            result = _verify(a)
        else:
            result = _cost(a)
        if result is not None and result.get("rank", 0) == 0:
            print(json.dumps(result))
        return 0
    except (ValueError, TypeError, RankFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if started:
            import torch.distributed as dist
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
