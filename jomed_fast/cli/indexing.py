"""The index's subcommands: ``build-index`` (embed index records with the retriever's two towers
into an fp16 index), ``index-synthetic`` (an index of N synthetic records, sharded under torchrun),
``verify-index`` (every checksum, image and the encoder) and ``index-cost`` (memory and search floors).

``python -m jomed_fast.index build-synthetic | verify | cost`` runs the last three under those names,
with the same options and errors.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

from .._checks import check_int
from .options import Command, Opt

BUILD_INDEX_OPTS = (
    Opt("records", str, None, "index records JSONL ({id, image_path, text})", required=True),
    Opt(
        "encoder",
        str,
        None,
        "retriever encoder directory (TinyCLIP, HF CLIP / SigLIP, open_clip, remote code)",
        required=True,
    ),
    Opt("out", str, None, "index directory (a rerun resumes an interrupted build)", required=True),
    Opt("batch_size", int, 256, "records per encoder call"),
    Opt("chunk_size", int, 1024, "records per resumable chunk"),
    Opt("trust_remote_code", bool, False, "run the encoder directory's own model code (jina-clip-v1)"),
    Opt("skip_bad", bool, False, "skip and count bad records instead of stopping"),
    Opt(
        "verify_images",
        str,
        "decode",
        "how far each image is checked before the build starts (decode: a "
        "truncated or half-written file is a bad record, which --skip-bad skips; open reads headers only)",
        choices=("none", "exists", "open", "decode"),
    ),
    Opt("progress", bool, True, "progress bar on stderr"),
    Opt(
        "samples",
        list,
        None,
        "sample JSONL files (train, val, test) checked against the index: a warning names the index "
        "records that are one of their samples (same id or image-file sha256)",
        default_doc="none checked",
    ),
)


def shared_with_samples(index, sample_files: list[str]) -> list[str]:
    """The ids of the index records that are a sample of ``sample_files`` by the rule retrieval
    leaves out (:mod:`jomed_fast.self_exclusion`: same record id or image sha256), in index order."""
    from ..data import load_samples
    from ..self_exclusion import RowKeys

    keys = RowKeys(index.records())
    shared: set[int] = set()
    for path in sample_files:
        for sample in load_samples(path, verify_images="exists"):
            by_id, by_image = keys.own_rows(sample)
            shared.update(by_id, by_image)
    return [keys.ids[n] for n in sorted(shared)]


def _warn_shared(shared: list[str], sample_files: list[str]) -> None:
    if shared:
        few = ", ".join(repr(i) for i in shared[:3]) + (", ..." if len(shared) > 3 else "")
        print(
            f"jomed-fast build-index: warning: {len(shared)} index record(s) are samples of --samples "
            f"{' '.join(sample_files)} (same id or image sha256: {few}); retrieval leaves them out of "
            "those samples' candidates unless --no-exclude-self",
            file=sys.stderr,
        )


def run_build_index(v: dict) -> int:
    from ..data import load_index_records
    from ..index import Index
    from ..retriever import load_encoder

    for path in v["samples"] or []:
        if not Path(path).is_file():
            raise ValueError(f"--samples: {path} not found")
    encoder = load_encoder(v["encoder"], trust_remote_code=v["trust_remote_code"])
    records = load_index_records(v["records"], skip_bad=v["skip_bad"], verify_images=v["verify_images"])
    if not records:
        skipped = f" ({records.n_skipped} bad record(s) skipped)" if records.n_skipped else ""
        raise ValueError(f"--records: {v['records']} holds no index record to embed{skipped}")
    index = Index.build(
        records, encoder, v["out"], batch_size=v["batch_size"], chunk_size=v["chunk_size"], progress=v["progress"]
    )
    summary = {"index": str(index.path), "count": index.count, "dim": index.dim, "skipped": records.n_skipped}
    if v["samples"]:
        shared = shared_with_samples(index, v["samples"])
        _warn_shared(shared, v["samples"])
        summary["shared_with_samples"] = len(shared)
    print(json.dumps(summary))
    return 0


SYNTHETIC_OPTS = (
    Opt("records", int, None, "number of synthetic index records N", required=True),
    Opt("out", str, None, "index directory (a rerun resumes an interrupted build)", required=True),
    Opt("chunk_size", int, 8192, "records per resumable chunk"),
    Opt("batch_size", int, 512, "records per encoder call"),
    Opt("seed", int, 0, "seed of the synthetic records and of the built-in encoder"),
    Opt(
        "encoder",
        str,
        None,
        "a saved encoder directory",
        default_doc="a deterministic untrained TinyCLIP, the same on every rank, saved to OUT/encoder",
    ),
    Opt("width", int, 32, "the built-in encoder's conv width"),
    Opt("depth", int, 4, "the built-in encoder's residual blocks"),
    Opt("dim", int, 64, "the built-in encoder's embedding dim D"),
    Opt("threads", int, None, "torch CPU threads per process", default_doc="CPU cores / WORLD_SIZE"),
    Opt("backend", str, "auto", "process-group backend under torchrun (auto: gloo)", choices=("auto", "gloo", "nccl")),
    Opt("progress", bool, True, "progress bar on stderr"),
)


def _world_size() -> int:
    world = os.environ.get("WORLD_SIZE", "1")
    if not world.isdigit() or int(world) < 1:
        raise ValueError(f"WORLD_SIZE: expected an int >= 1 (set by torchrun), got {world!r}")
    return int(world)


@contextlib.contextmanager
def _process_group(backend: str):
    """The default process group from torchrun's environment (WORLD_SIZE > 1) for the block's
    duration; nothing when there is one process or a group is already up."""
    import torch
    import torch.distributed as dist

    if _world_size() == 1 or dist.is_initialized():
        yield
        return
    backend = "gloo" if backend == "auto" else backend
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    try:
        yield
    finally:
        dist.destroy_process_group()


def run_index_synthetic(v: dict) -> int:
    import torch
    import torch.distributed as dist

    from ..index import build_synthetic_index, synthetic_encoder
    from ..retriever import load_encoder

    for name in ("records", "chunk_size", "batch_size", "width", "depth", "dim", "threads"):
        if v[name] is not None:  # threads: None is its default
            check_int("--" + name.replace("_", "-"), v[name], 1)
    torch.set_num_threads(v["threads"] or max(1, (os.cpu_count() or 1) // _world_size()))
    with _process_group(v["backend"]):
        if v["encoder"] is not None:
            encoder = load_encoder(v["encoder"])
        else:
            encoder = synthetic_encoder(seed=v["seed"], width=v["width"], depth=v["depth"], dim=v["dim"])
        t0 = time.perf_counter()
        ix = build_synthetic_index(
            v["records"],
            encoder,
            v["out"],
            seed=v["seed"],
            batch_size=v["batch_size"],
            chunk_size=v["chunk_size"],
            progress=v["progress"],
        )
        seconds = time.perf_counter() - t0
        up = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if up else (0, 1)
    if rank == 0:
        if v["encoder"] is None:
            encoder.save(Path(v["out"]) / "encoder")
        print(
            json.dumps(
                {
                    "out": str(v["out"]),
                    "count": ix.count,
                    "dim": ix.dim,
                    "seconds": round(seconds, 3),
                    "world": world,
                    "rank": rank,
                    "sha256": ix.manifest["sha256"],
                }
            )
        )
    return 0


VERIFY_OPTS = (
    Opt("index", str, None, "index directory", required=True, positional=True),
    Opt("encoder", str, None, "encoder directory whose fingerprint must be the index's", default_doc="not checked"),
    Opt("trust_remote_code", bool, False, "run the encoder directory's own model code (jina-clip-v1)"),
    Opt("image_root", str, None, "where the record images are now", default_doc="the folder recorded at build time"),
    Opt(
        "images",
        bool,
        True,
        "read every image file against its recorded sha256 (--no-images: the index's own files only)",
    ),
)


def run_verify_index(v: dict) -> int:
    from ..index import Index
    from ..retriever import load_encoder

    t0 = time.perf_counter()
    encoder = load_encoder(v["encoder"], trust_remote_code=v["trust_remote_code"]) if v["encoder"] else None
    ix = Index.open(v["index"], encoder=encoder)
    images = ix.check_images(v["image_root"]) if v["images"] else None
    print(
        json.dumps(
            {
                "path": str(v["index"]),
                "count": ix.count,
                "dim": ix.dim,
                "ok": True,
                "images": images,
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )
    )
    return 0


COST_OPTS = (
    Opt("records", int, None, "rows N", default_doc="the paper's index: PMC-OA + ROCO + MIMIC-CXR"),
    Opt("dim", int, 768, "embedding dim D"),
    Opt("nlist", int, None, "IVF lists", default_doc="the cost model's for N"),
    Opt("nprobe", int, 32, "IVF lists probed per query"),
    Opt("k", int, 10, "results per query"),
    Opt("json", bool, False, "print the cost model as JSON instead of the table"),
)


def run_index_cost(v: dict) -> int:
    from ..index.cost import cost_markdown, index_cost

    for name in ("records", "dim", "nlist", "nprobe", "k"):
        if v[name] is not None:  # records, nlist: None is the paper's index, the model's lists
            check_int("--" + name, v[name], 1)
    c = index_cost(v["records"], v["dim"], nlist=v["nlist"], nprobe=v["nprobe"], k=v["k"])
    print(json.dumps(c) if v["json"] else cost_markdown(c))
    return 0


COMMANDS = (
    Command(
        "build-index",
        "embed index records into an fp16 two-head index",
        "Embeds every record's image (image tower) and caption (text tower), L2-normalised, stored "
        "fp16 with a manifest of checksums; image paths are stored relative to the records file's "
        "folder, with each image's sha256. A rerun resumes an interrupted build, embedding again "
        "the chunks whose records changed; another encoder or chunk size is refused.",
        BUILD_INDEX_OPTS,
        run_build_index,
    ),
    Command(
        "index-synthetic",
        "build an index of N synthetic records (resumable; sharded under torchrun)",
        "The index build at scale without data: N synthetic records embedded in resumable chunks. Under "
        "torchrun (WORLD_SIZE > 1) the default process group is initialised and rank r embeds the "
        "chunks c with c mod W = r; the files do not depend on the number of ranks. Rerunning the same "
        "command after a kill resumes.",
        SYNTHETIC_OPTS,
        run_index_synthetic,
    ),
    Command(
        "verify-index",
        "check every checksum of an index, the images it names and its encoder",
        "Opens the index (the sha256 of every file, the arrays' shapes, the encoder's fingerprint with "
        "--encoder) and rehashes every record's image against the sha256 recorded at build time, naming "
        "the first missing or changed one.",
        VERIFY_OPTS,
        run_verify_index,
    ),
    Command(
        "index-cost",
        "memory and search-cost floors of an index (default: the paper's)",
        "The analytic cost model of jomed_fast.index.cost: memory per head and device, exact and IVF "
        "search floors on an L40 and an H100.",
        COST_OPTS,
        run_index_cost,
    ),
)
