"""``build-index``: embed index records with the retriever's two towers into an fp16 index."""

from __future__ import annotations

import json

from .options import Command, Opt

BUILD_INDEX_OPTS = (
    Opt("records", str, None, "index records JSONL ({id, image_path, text})", required=True),
    Opt("encoder", str, None, "retriever encoder directory (TinyCLIP or CLIP)", required=True),
    Opt("out", str, None, "index directory (a rerun resumes an interrupted build)", required=True),
    Opt("batch_size", int, 256, "records per encoder call"),
    Opt("chunk_size", int, 1024, "records per resumable chunk"),
    Opt("trust_remote_code", bool, False, "allow the encoder's own code (jina-clip)"),
    Opt("skip_bad", bool, False, "skip and count bad records instead of stopping"),
    Opt("verify_images", str, "decode", "how far each image is checked before the build starts (decode: a "
        "truncated or half-written file is a bad record, which --skip-bad skips; open reads headers only)",
        choices=("none", "exists", "open", "decode")),
    Opt("progress", bool, True, "progress bar on stderr"),
)


def run_build_index(v: dict) -> int:
    from ..data import load_index_records
    from ..index import Index
    from ..retriever import load_encoder

    encoder = load_encoder(v["encoder"], trust_remote_code=v["trust_remote_code"])
    records = load_index_records(v["records"], skip_bad=v["skip_bad"], verify_images=v["verify_images"])
    if not records:
        skipped = f" ({records.n_skipped} bad record(s) skipped)" if records.n_skipped else ""
        raise ValueError(f"--records: {v['records']} holds no index record to embed{skipped}")
    index = Index.build(records, encoder, v["out"], batch_size=v["batch_size"], chunk_size=v["chunk_size"],
                        progress=v["progress"])
    print(json.dumps({"index": str(index.path), "count": index.count, "dim": index.dim,
                      "skipped": records.n_skipped}))
    return 0


COMMANDS = (
    Command("build-index", "embed index records into an fp16 two-head index",
            "Embeds every record's image (image tower) and caption (text tower), L2-normalised, stored "
            "fp16 with a manifest of checksums; image paths are stored relative to the records file's "
            "folder, with each image's sha256. A rerun resumes an interrupted build, embedding again "
            "the chunks whose records changed; another encoder or chunk size is refused.",
            BUILD_INDEX_OPTS, run_build_index),
)
