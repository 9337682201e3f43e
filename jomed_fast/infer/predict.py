r"""Inference: retrieve, score every candidate with the reader, fuse, decide, write JSONL.

For a batch of B queries (images + questions):

1. **retrieve** (NVTX ``jomed.retrieve``): the retriever's query embeddings ``[B, D]``, the top
   ``k_text`` of the text head and ``k_image`` of the image head (``K = k_T + k_I``, default 2 + 2 as
   the reference) — or, for the robustness study (paper Table 7), no retrieval (``K = 1``, the plain
   query prompt) or K random index records (uniform weights);
2. **score** (``jomed.score``): ``CandidateScorer`` -> class log-probs ``[B, K, C]`` (query image
   optionally left out: the "no query image" row of Table 7);
3. **fuse** (``jomed.fuse``): ``fusion.fuse`` (``paper`` or ``reference``) -> ``p(c | q)`` ``[B, C]``,
   then ``fusion.decide`` (argmax, or the multi-label threshold);
   Open VQA (``open_vqa``): K greedy answers per query instead, fused over identical normalised
   strings weighted by ``softmax(s)_k * exp(mean token log-prob)``;
4. **write**: one :class:`~jomed_fast.analysis.records.PredictionRecord` per query, with every
   candidate's record id, head, retrieval score, class probabilities and individual prediction, so
   the analyses (inconsistent split, oracle, rerankers) can be redone offline.

Predictions are appended to the JSONL batch by batch (flushed and fsynced); a rerun with the same
settings skips the queries already written (a torn last line from a crash is dropped), so an
interrupted run resumes. A sidecar ``<out>.meta.json`` records the settings; a rerun with other
settings is refused rather than mixing two runs in one file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .._files import atomic_write_via
from ..analysis.records import Candidate as CandidateRecord
from ..analysis.records import PredictionRecord
from .._profiling import stage
from .fusion import FUSIONS, decide, fuse
from .open_vqa import fuse_open_answers, generate_answers

__all__ = ["RETRIEVAL_MODES", "InferConfig", "predict", "read_predictions"]

RETRIEVAL_MODES = ("retrieved", "none", "random")


@dataclasses.dataclass(frozen=True)
class InferConfig:
    """Inference settings (JSON-serialisable; the CLI maps one flag to each field).

    Attributes:
        k_text, k_image: candidates from each head (reference: 2 + 2).
        layout: prompt layout, ``"paper"`` or ``"shared_query"``.
        fusion: ``"paper"`` (``sum_k p_k softmax(s)_k``) or ``"reference"`` (see ``fusion``).
        tau: retrieval-score temperature of the ``paper`` fusion.
        threshold: multi-label decision threshold on the fused per-label probability.
        batch_size: queries per scorer call.
        retrieval: ``"retrieved"``, ``"none"`` (no retrieval) or ``"random"`` (random records).
        query_image: False leaves the query image out of the prompt (robustness study).
        seed: the random-retrieval generator's seed.
        max_new_tokens: the greedy answer's length limit (open VQA).
    """

    k_text: int = 2
    k_image: int = 2
    layout: str = "paper"
    fusion: str = "paper"
    tau: float = 1.0
    threshold: float = 0.5
    batch_size: int = 4
    retrieval: str = "retrieved"
    query_image: bool = True
    seed: int = 0
    max_new_tokens: int = 16

    def __post_init__(self):
        if self.k_text < 0 or self.k_image < 0 or self.k_text + self.k_image == 0:
            raise ValueError(f"k_text, k_image: expected >= 0 with a positive sum, got {self.k_text}, {self.k_image}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion: expected one of {FUSIONS}, got {self.fusion!r}")
        if self.retrieval not in RETRIEVAL_MODES:
            raise ValueError(f"retrieval: expected one of {RETRIEVAL_MODES}, got {self.retrieval!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {self.batch_size}")
        if not self.tau > 0:
            raise ValueError(f"tau: expected > 0, got {self.tau}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected >= 1, got {self.max_new_tokens}")

    @property
    def k(self) -> int:
        return 1 if self.retrieval == "none" else self.k_text + self.k_image


# --------------------------------------------------------------------------------------------- files
def _complete_records(path: Path) -> tuple[list[PredictionRecord], int]:
    """(complete records, byte length of the complete lines); a torn last line is left out."""
    out, good = [], 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            if line.strip():
                out.append(PredictionRecord.from_dict(json.loads(line)))
            good += len(line)
    return out, good


def read_predictions(path: str | os.PathLike) -> list[PredictionRecord]:
    """Complete records of a prediction JSONL (a torn last line, from a crash, is ignored)."""
    return _complete_records(Path(path))[0]


def _prepare_output(out_path: Path, meta: dict) -> list[PredictionRecord]:
    """Check the sidecar settings, drop a torn tail, and return what is already written."""
    meta_path = out_path.with_name(out_path.name + ".meta.json")
    if out_path.exists() and meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old != meta:
            changed = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            raise ValueError(f"out_path: {out_path} holds predictions made with other settings ({changed}); "
                             "remove it or write elsewhere")
        done, good = _complete_records(out_path)
        with open(out_path, "r+b") as f:  # cut a torn tail so appends start on a line boundary
            f.truncate(good)
        return done
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_via(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1, sort_keys=True)))
    atomic_write_via(out_path, lambda tmp: Path(tmp).write_text(""))
    return []


def _append(out_path: Path, records: Sequence[PredictionRecord]) -> None:
    with open(out_path, "a") as f:
        f.writelines(json.dumps(r.to_dict()) + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------- steps
def _candidates(config: InferConfig, retrieval, encoder, images, gen: torch.Generator):
    """(candidates [B][K], scores [B, K], heads [B][K], record ids [B][K]) for one batch."""
    B = len(images)
    if config.retrieval == "none":
        return [[None] for _ in range(B)], torch.zeros(B, 1), [["none"] for _ in range(B)], [["-"] for _ in range(B)]
    if retrieval is None:
        raise ValueError(f"retrieval: config.retrieval={config.retrieval!r} needs a Retrieval (index + records)")
    if config.retrieval == "random":
        rows = torch.randint(len(retrieval.records), (B, config.k), generator=gen)
        cands = [[retrieval.candidate(int(n)) for n in row] for row in rows]
        ids = [[c.id for c in row] for row in cands]
        return cands, torch.zeros(B, config.k), [["random"] * config.k for _ in range(B)], ids
    if encoder is None:
        raise ValueError("encoder: retrieval needs the retriever's query encoder (encode_images)")
    with torch.no_grad():
        q = encoder.encode_images(images)
    got = retrieval.search(q, config.k_text, config.k_image)
    ids = [[c.id for c in row] for row in got.candidates]
    return got.candidates, got.scores.float(), got.heads, ids


def _records(task, batch, log_probs, scores, heads, ids, fused, config) -> list[PredictionRecord]:
    multilabel = task.is_multilabel
    per_candidate = [decide(log_probs[:, k].exp(), multilabel, config.threshold) for k in range(log_probs.shape[1])]
    fused_pred = decide(fused, multilabel, config.threshold)
    out = []
    for b, sample in enumerate(batch):
        gold = sorted(sample.label) if multilabel else int(sample.label)
        cands = [CandidateRecord(id=str(ids[b][k]), head=heads[b][k], score=float(scores[b, k]),
                                 probs=[float(p) for p in log_probs[b, k].exp()], prediction=per_candidate[k][b])
                 for k in range(log_probs.shape[1])]
        out.append(PredictionRecord(query_id=str(sample.id), gold=gold, kind=task.kind, candidates=cands,
                                    fused=fused_pred[b], fused_probs=[float(p) for p in fused[b]]))
    return out


def _open_records(scorer, batch, images, cands, scores, heads, ids, config) -> list[PredictionRecord]:
    """Open VQA: K greedy answers per query, fused over normalised strings (``open_vqa``)."""
    out = []
    for b, sample in enumerate(batch):
        with stage("jomed.generate"):
            answers, mean_lp = generate_answers(scorer.reader, scorer.task, scorer.layout,
                                                images[b] if config.query_image else None, sample.question,
                                                cands[b], config.max_new_tokens)
        weights = torch.softmax(scores[b].double() / config.tau, 0)
        fused, _ = fuse_open_answers(answers, mean_lp, weights)
        cand_recs = [CandidateRecord(id=str(ids[b][k]), head=heads[b][k], score=float(scores[b, k]),
                                     probs=[float(mean_lp[k].exp())], prediction=answers[k])
                     for k in range(len(answers))]
        out.append(PredictionRecord(query_id=str(sample.id), gold=str(sample.answer), kind=scorer.task.kind,
                                    candidates=cand_recs, fused=fused))
    return out


def predict(scorer, samples: Sequence, *, retrieval=None, encoder=None, config: InferConfig = InferConfig(),
            out_path: str | os.PathLike | None = None, progress: bool = True) -> list[PredictionRecord]:
    """Predict every sample; returns the records in sample order (and appends them to ``out_path``).

    Args:
        scorer: a ``CandidateScorer`` (its reader, task and layout are used as they are); for an
            open-VQA task an ``OpenAnswerer(reader, task, layout)``.
        samples: ``jomed_fast.data`` samples (``id``, ``load_image()``, ``question``, ``label``).
        retrieval: a ``jomed_fast.retrieval.Retrieval`` (not needed for ``retrieval="none"``).
        encoder: the retriever's query encoder (``encode_images``), for ``retrieval="retrieved"``.
        out_path: JSONL to append to and resume from (None: keep in memory only).
    """
    task = scorer.task
    if config.layout != scorer.layout:
        raise ValueError(f"config: layout {config.layout!r} differs from the scorer's {scorer.layout!r}")
    ids = [str(s.id) for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError("samples: expected unique ids (predictions are resumed by id)")
    done: dict[str, PredictionRecord] = {}
    path = Path(out_path) if out_path is not None else None
    if path is not None:
        meta = {"config": dataclasses.asdict(config), "task": task.name,
                "reader": str(getattr(scorer.reader, "path", "")), "n_samples": len(samples)}
        done = {r.query_id: r for r in _prepare_output(path, meta)}
    todo = [s for s in samples if str(s.id) not in done]
    gen = torch.Generator().manual_seed(config.seed)
    with tqdm(total=len(samples), initial=len(samples) - len(todo), desc="predict", disable=not progress) as bar:
        for lo in range(0, len(todo), config.batch_size):
            batch = todo[lo: lo + config.batch_size]
            images = [s.load_image() for s in batch]
            with stage("jomed.retrieve"):
                cands, scores, heads, rec_ids = _candidates(config, retrieval, encoder, images, gen)
            if task.is_open:
                new = _open_records(scorer, batch, images, cands, scores, heads, rec_ids, config)
            else:
                with stage("jomed.score"), torch.no_grad():
                    log_probs = scorer.score(images if config.query_image else [None] * len(batch),
                                             [s.question for s in batch], cands).float()
                with stage("jomed.fuse"):
                    method = config.fusion if config.retrieval == "retrieved" else "paper"  # no head scores otherwise
                    fused = fuse(log_probs, scores, heads, method, config.tau)
                new = _records(task, batch, log_probs, scores, heads, rec_ids, fused, config)
            if path is not None:
                _append(path, new)
            done.update((r.query_id, r) for r in new)
            bar.update(len(batch))
    return [done[i] for i in ids]
