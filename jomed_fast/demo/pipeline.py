"""The whole JOMED method on the synthetic task, end to end, each step resumable.

Steps (``out_dir/<step>``; a step whose output is complete is skipped on a rerun):

1. ``data``      the synthetic task and index written to disk (``data.synthetic``);
2. ``retriever`` the tiny CLIP retriever pre-trained contrastively on the index's pairs;
3. ``index``     the two-head fp16 index of every record;
4. ``stage1_reader_only`` / ``stage1_rag``  stage 1 without retrieval (the paper's reader-only
   baseline) and with the frozen retriever's top 2 + 2 (fine-tuned RAG);
5. ``stage2``    the fine-tuned RAG reader frozen, the retriever trained by distillation (text
   head, then image head);
6. ``predictions`` test-split inference for reader-only, fine-tuned RAG and JOMED, and JOMED's
   robustness variants (no retrieval, random retrieval, no query image);
7. ``report``    the analyses (``demo.report``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from ..data.io import atomic_write_json
from .config import DemoConfig

__all__ = ["check_run_settings", "run_demo", "run_systems"]

SYSTEMS = ("reader_only", "ft_rag", "jomed", "jomed_no_retrieval", "jomed_random_retrieval", "jomed_no_query_image")


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _stored_settings(path: Path) -> dict:
    try:
        old = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        old = None
    if isinstance(old, dict):
        return old
    raise ValueError(f"out_dir: {path} is not a run's settings (not a JSON object); use another directory")


def check_run_settings(out: Path, new: dict, name: str = "demo_config.json") -> None:
    """A rerun resumes only a run of the same settings (``out/name`` holds them; written on the
    first run); a settings file that is not this run's kind (damaged, or with other setting names)
    is refused as well, naming the file."""
    path = out / name
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, new)
        return
    old = _stored_settings(path)
    if set(old) != set(new):
        raise ValueError(
            f"out_dir: {path} holds other setting names than this run's (not here: "
            f"{sorted(set(old) - set(new))}, missing: {sorted(set(new) - set(old))}); "
            "use another directory"
        )
    changed = [k for k in new if old[k] != new[k]]
    if changed:
        raise ValueError(f"out_dir: {out} holds a run with other settings ({changed}); use another directory")


def _data(out: Path, config: DemoConfig, progress: bool):
    from ..data.synthetic import generate, load_synthetic, write_synthetic

    d = out / "data"
    if not (d / "manifest.json").exists():
        _log("writing the synthetic task and index", progress)
        write_synthetic(generate(seed=config.seed, **dataclasses.asdict(config.data)), d)
    return load_synthetic(d)


def _retriever(out: Path, config: DemoConfig, ds, image_size: int, progress: bool):
    from ..retriever import TinyCLIP, pretrain

    d = out / "retriever"
    if not (d / "done.json").exists():
        _log("pre-training the tiny retriever (contrastive)", progress)
        captions = [r.text for r in ds.index]
        settings = config.retriever
        model = TinyCLIP.from_captions(
            captions,
            seed=config.seed,
            image_size=image_size,
            width=settings.width,
            depth=settings.depth,
            dim=settings.dim,
        )
        losses = pretrain(
            model,
            [r.load_image() for r in ds.index],
            captions,
            epochs=settings.epochs,
            seed=config.seed,
            progress=progress,
        )
        model.save(d)
        atomic_write_json(d / "done.json", {"first_loss": losses[0], "last_loss": losses[-1]})
    return TinyCLIP.load(d)


def _index(out: Path, ds, encoder, progress: bool):
    from ..candidate_retrieval import Retrieval
    from ..index import Index

    d = out / "index"
    index = (
        Index.open(d, encoder)
        if (d / "manifest.json").exists()
        else Index.build(ds.index, encoder, d, batch_size=256, chunk_size=512, progress=progress)
    )
    return Retrieval(index, ds.index)


def _reader_checkpoint(out: Path, config: DemoConfig) -> Path:
    from ..readers import tiny

    d = out / "reader"
    if not (d / "config.json").exists():
        torch.manual_seed(config.seed)
        tiny.build(config.arch, d)
    return d


def _stage1(
    out: Path, name: str, config: DemoConfig, ckpt: Path, ds, retrieval, encoder, progress: bool, options: dict
) -> Path:
    from ..readers import load_reader
    from ..train.reader import train_reader

    run = out / name
    if not (run / "result.json").exists():
        _log(f"stage 1: {name}", progress)
        torch.manual_seed(config.seed)
        r = config.stage1.lora_r
        reader = load_reader(ckpt, lora={"r": r, "alpha": 2 * r}, device="cpu")
        rc = dataclasses.replace(config.reader_config(retrieval=retrieval is not None), **options)
        train_reader(
            rc, reader, ds.task, ds.train, ds.val, run, retrieval=retrieval, retriever=encoder, progress=progress
        )
    return run / "adapter"


def _frozen_reader(ckpt: Path, adapter: Path):
    from ..readers import load_reader

    reader = load_reader(ckpt, lora=adapter, device="cpu")
    reader.model.requires_grad_(False)
    return reader.eval()


def _stage2(out: Path, config: DemoConfig, reader, ds, retrieval, base, progress: bool):
    """The trained per-head query encoders (``retriever.HeadEncoders``), trained once and kept in
    ``stage2/query_encoder``."""
    from ..retriever import load_head_encoders
    from ..train.retriever_heads import train_retriever_heads

    d = out / "stage2"
    if not (d / "query_encoder" / "done.json").exists():
        _log("stage 2: retriever distillation (text head, then image head)", progress)
        trained = train_retriever_heads(
            config.retriever_config("text"),
            reader,
            ds.task,
            base,
            retrieval,
            ds.train[: config.stage2.queries],
            ds.val,
            d,
            progress=progress,
            image_config=config.retriever_config("image"),
        )
        trained.encoders.save(d / "query_encoder")
        atomic_write_json(d / "query_encoder" / "done.json", {h: r.to_dict() for h, r in trained.results().items()})
    return load_head_encoders(d / "query_encoder", base)


def _predict_all(out: Path, config: DemoConfig, ds, retrieval, base, jomed_encoder, readers, progress: bool) -> dict:
    from ..infer import predict, read_predictions
    from ..scoring import CandidateScorer

    d = out / "predictions"
    d.mkdir(exist_ok=True)
    ic = config.infer_config
    plan = {
        "reader_only": (readers["reader_only"], None, ic(retrieval="none")),
        "ft_rag": (readers["rag"], base, ic()),
        "jomed": (readers["rag"], jomed_encoder, ic()),
        "jomed_no_retrieval": (readers["rag"], None, ic(retrieval="none")),
        "jomed_random_retrieval": (readers["rag"], None, ic(retrieval="random")),
        "jomed_no_query_image": (readers["rag"], jomed_encoder, ic(query_image=False)),
    }
    out_records = {}
    for name in SYSTEMS:
        reader, encoder, ic = plan[name]
        path = d / f"{name}.jsonl"
        done = path.exists() and len(read_predictions(path)) == len(ds.test)
        if not done:
            _log(f"inference: {name}", progress)
        scorer = CandidateScorer(reader, ds.task, config.layout)
        out_records[name] = predict(
            scorer,
            ds.test,
            retrieval=retrieval,
            encoder=encoder,
            config=ic,
            out_path=path,
            progress=progress and not done,
        )
    return out_records


def run_systems(
    out: Path, config: DemoConfig, ds, *, image_size: int, reader_options: dict | None = None, progress: bool = True
) -> dict:
    """Steps 2-6 on ``ds`` (``task``, ``train``, ``val``, ``test``, ``index``: the synthetic set's
    or any labelled task's): ``{system: prediction records}`` of :data:`SYSTEMS` on ``ds.test``.
    ``config``'s ``data`` group is not read; ``image_size`` is the retriever's input side;
    ``reader_options`` (``train.ReaderTrainConfig`` fields) change both stage-1 runs."""
    options = dict(reader_options or {})
    base = _retriever(out, config, ds, image_size, progress)
    retrieval = _index(out, ds, base, progress)
    ckpt = _reader_checkpoint(out, config)
    adapters = {
        "reader_only": _stage1(out, "stage1_reader_only", config, ckpt, ds, None, None, progress, options),
        "rag": _stage1(out, "stage1_rag", config, ckpt, ds, retrieval, base, progress, options),
    }
    readers = {name: _frozen_reader(ckpt, path) for name, path in adapters.items()}
    jomed_encoder = _stage2(out, config, readers["rag"], ds, retrieval, base, progress)
    return _predict_all(out, config, ds, retrieval, base, jomed_encoder, readers, progress)


def run_demo(out_dir, config: DemoConfig | None = None, *, progress: bool = True) -> dict:
    """Run (or resume) the demo in ``out_dir``; returns the report's summary (tables and checks)."""
    from ..analysis import index_labels
    from .report import write_report

    config = config if config is not None else DemoConfig()
    out = Path(out_dir)
    check_run_settings(out, config.to_dict())
    start = time.time()
    torch.manual_seed(config.seed)
    ds = _data(out, config, progress)
    records = run_systems(out, config, ds, image_size=config.data.image_size, progress=progress)
    summary = write_report(
        out / "report",
        records,
        ds.task.num_classes,
        seed=config.seed,
        findings_asserted=config.asserts_findings,
        class_names=ds.task.labels,
        index_labels=index_labels(ds.index, ds.task),
    )
    summary["seconds"] = round(time.time() - start, 1)
    atomic_write_json(out / "report" / "summary.json", summary)
    _log(f"done in {summary['seconds']:.0f} s; report: {out / 'report' / 'report.md'}", progress)
    return summary
