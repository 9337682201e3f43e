"""Stage-2 test setup, importable by the tests and runnable as a subprocess (the SIGKILL test).

``build(root)`` writes once: a tiny Qwen2-VL reader (``root/reader``), a tiny CLIP base encoder
(``root/encoder``) and an index of synthetic records (``root/index``). ``load(root)`` opens them
(the records are re-rendered: they are a pure function of the synthetic config).

    python tests/_stage2_worker.py ARGS.json   # {"root", "run_dir", "config", "resume", "out"}

runs ``train_retriever`` single-threaded (``run(args)`` does the same in-process) and writes the
learned trainable weights to ``out`` (safetensors) and the result to ``out + ".json"``.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

SYNTH = {
    "seed": 3,
    "image_size": 32,
    "n_train": 16,
    "n_val": 8,
    "n_test": 0,
    "index_size": 96,
    "prototypes_per_class": 4,
}


def _generator():
    from jomed_fast.data.synthetic import SyntheticGenerator

    return SyntheticGenerator(**SYNTH)


def build(root: Path) -> Path:
    from jomed_fast.index import Index
    from jomed_fast.readers import tiny
    from jomed_fast.retriever import TinyCLIP

    root = Path(root)
    tiny.build("qwen2_vl", root / "reader")
    if not (root / "index" / "manifest.json").is_file():
        recs = _generator().index_records()
        enc = TinyCLIP.from_captions([r.text for r in recs], seed=0, width=8, depth=2, dim=16)
        enc.save(root / "encoder")
        Index.build(recs, enc, root / "index", batch_size=96, chunk_size=96, progress=False)
    return root


def load(root: Path):
    """(reader, base encoder, retrieval, train samples, val samples)."""
    from jomed_fast.candidate_retrieval import Retrieval
    from jomed_fast.index import Index
    from jomed_fast.readers import load_reader
    from jomed_fast.retriever import TinyCLIP

    root = Path(root)
    gen = _generator()
    recs = gen.index_records()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reader = load_reader(root / "reader", device="cpu")
    enc = TinyCLIP.load(root / "encoder")
    retrieval = Retrieval(Index.open(root / "index"), recs)
    return reader, enc, retrieval, gen.samples("train"), gen.samples("val")


def learned_weights(result_encoder) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in result_encoder.named_parameters() if p.requires_grad}


def run(args: dict, loaded=None) -> None:
    """Train as ``args`` says (``loaded``: what ``load(root)`` returned, to skip loading again)."""
    from safetensors.torch import save_file

    from jomed_fast.retriever import QueryEncoder
    from jomed_fast.train.retriever import RetrieverTrainConfig, train_retriever

    torch.set_num_threads(1)
    reader, enc, retrieval, train, _val = loaded or load(Path(args["root"]))
    config = RetrieverTrainConfig.from_dict(args["config"])
    qe = QueryEncoder(enc, config.n_trainable, config.alpha)
    result = train_retriever(
        config, reader, "synthetic", qe, retrieval, train, None, args["run_dir"], resume=args["resume"], progress=False
    )
    save_file({n: t.contiguous() for n, t in learned_weights(qe.learned).items()}, args["out"])
    Path(args["out"] + ".json").write_text(json.dumps(result.to_dict()))


if __name__ == "__main__":
    run(json.loads(Path(sys.argv[1]).read_text()))
