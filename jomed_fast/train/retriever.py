r"""Stage 2 of JOMED: retriever fine-tuning by Sharp Perplexity Distillation (reader frozen).

For a batch of B training queries (image :math:`x_b`, question, gold class :math:`a_b`):

1. **candidates** — the *candidate encoder* (a frozen copy of the learned query encoder,
   re-copied every ``refresh_every`` steps; the reference's ``base_retriever``) embeds the query
   images and the index returns the top K rows of the trained head (``text``: index captions,
   ``image``: index images; the other head brings nothing);
2. **reader posterior** — the frozen reader's class log-probabilities ``[B, K, C]``
   (``CandidateScorer``), through the exact score cache (:mod:`.score_cache`, :mod:`.pair_scores`),
   and their gold entries :math:`r_{b,k} = \log p_C(a_b \mid z_k, q_b)` ``[B, K]``;
3. **retriever scores** — :math:`s_{b,k} = \tilde q_b \cdot e_k` with the trainable query embedding
   :math:`\tilde q_b = \mathrm{norm}(\alpha\, f_\theta(x_b) + (1-\alpha)\, f_0(x_b)) \in \mathbb{R}^D`
   (``retriever.QueryEncoder``: :math:`f_0` is the frozen initial encoder, never refreshed, as the
   reference's ``passage_encoder_for_train``) and the fixed index embeddings
   :math:`e_k \in \mathbb{R}^D` of the candidates (``Retrieval.embeddings``);
4. **loss** — ``ops.retrieval_kl_loss(s, t, tau_retriever, tau_reader)``
   :math:`= \frac1B \sum_b \mathrm{KL}(\mathrm{softmax}(t_b/\tau_{reader}) \,\|\,
   \mathrm{softmax}(s_b/\tau_{retriever}))` with target logits :math:`t = r` (``target="gold"``,
   the paper) or :math:`t = \log\mathrm{softmax}(r) + \log\mathrm{softmax}(s.\mathrm{detach}())`
   (``"gold_with_retriever_prior"``, the reference scripts' ``--add_prior_to_gold_score``);
   AdamW on the last ``n_trainable`` image-tower layers, linear warm-up + cosine decay.

Metrics (per epoch, on ``val`` or else the training queries, candidates from the current
candidate encoder): the KL above with the paper's target, the **top-1 agreement**
:math:`\frac1B\sum_b [\arg\max_k s_{b,k} = \arg\max_k r_{b,k}]` — how often the retriever's first
choice is the reader's — and the **head-only accuracy**: the head's top ``select_k`` under the
trained query embedding, fused by the paper's rule. Given a ``partner`` (the other head as
inference will run it: its query encoder and its k), also the **system accuracy**: the head's top
``select_k`` and the partner's top k, fused together, which is what the deployed retriever scores.
``select="best_val_accuracy"`` keeps the epoch (step 0 included) with the highest system accuracy
(head-only without a partner; checkpoint ``best``, restored at the end).

Faults: checkpoints (:mod:`.checkpoint`: trainable weights, the candidate encoder's copies of them,
AdamW, scheduler, RNG, data position, history) every ``checkpoint_every`` steps and at the end;
``resume=True`` continues exactly (bitwise on CPU). A non-finite loss raises
:class:`~.guards.NonFiniteLossError` before anything is applied; the last checkpoint stays.
The data order of epoch e is a pure function of (seed, e) (:mod:`.data_order`).

``train_retriever`` trains one head; ``train_retriever_heads`` both, as the reference: the text
head, then the image head, each its own query encoder started from the base encoder
(``retriever.HeadEncoders``; ``run_dir/text``, ``run_dir/image``, one score cache
``run_dir/score_cache.bin`` shared by both). Each head is selected by the system it will serve
in: the text head beside the base image head, the image head beside the selected text head.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import ops
from .._files import atomic_write_via
from ..readers.fingerprint import reader_fingerprint
from ..retriever.dual import QueryEncoder
from ..retriever.heads import HeadEncoders
from .checkpoint import (
    CHECKPOINT_DIR,
    STATE_JSON,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_named,
)
from .data_order import batches_per_epoch, epoch_batches, epoch_order
from .guards import check_finite
from .pair_scores import PairScores, gold_log_likelihoods, scoring_layout
from .retriever_config import RetrieverTrainConfig
from .schedule import WarmupCosine
from .score_cache import ScoreCache

__all__ = [
    "HeadsResult",
    "Partner",
    "RetrieverTrainConfig",
    "RetrieverTrainResult",
    "distillation_loss",
    "evaluate_retriever",
    "retriever_scores",
    "train_retriever",
    "train_retriever_heads",
]

CONFIG_FILE = "config.json"
RESULT_FILE = "result.json"
CACHE_FILE = "score_cache.bin"


# ------------------------------------------------------------------------------------------- math
def retriever_scores(q: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``q [B, D]`` x ``e [B, K, D]`` -> ``s [B, K]`` with ``s[b, k] = q[b] · e[b, k]``."""
    if q.dim() != 2 or e.dim() != 3 or e.shape[0] != q.shape[0] or e.shape[2] != q.shape[1]:
        raise ValueError(f"q, e: expected [B, D] and [B, K, D], got {tuple(q.shape)} and {tuple(e.shape)}")
    return torch.einsum("bd,bkd->bk", q, e.to(q.dtype))


def distillation_target(s: torch.Tensor, r: torch.Tensor, target: str) -> torch.Tensor:
    """Target logits ``[B, K]`` (divided by ``tau_reader`` inside the loss); see the module docstring."""
    if target == "gold":
        return r
    if target == "gold_with_retriever_prior":
        return torch.log_softmax(r.float(), -1) + torch.log_softmax(s.detach().float(), -1)
    raise ValueError(f"target: expected 'gold' or 'gold_with_retriever_prior', got {target!r}")


def distillation_loss(s: torch.Tensor, r: torch.Tensor, config: RetrieverTrainConfig) -> torch.Tensor:
    """The stage-2 loss (scalar, mean over B): ``KL(softmax(t / tau_reader) || softmax(s / tau_retriever))``."""
    t = distillation_target(s, r, config.target)
    return ops.retrieval_kl_loss(s, t, config.tau_retriever, config.tau_reader)


def top1_agreement(s: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: the retriever's top candidate is the reader's (argmax over K, first on ties)."""
    return s.argmax(-1) == r.argmax(-1)


class _WarmupStepsCosine(WarmupCosine):
    """``WarmupCosine`` with the warm-up given in steps (the reference's ``--warmup_steps``)."""

    def __init__(self, total_steps: int, warmup_steps: int):
        super().__init__(total_steps, 0.0)
        self.warmup_steps = min(int(warmup_steps), self.total_steps)


# ------------------------------------------------------------------------------------------ data
@dataclasses.dataclass
class _Queries:
    """The query set: ids, samples (images read per batch, never all held), questions, gold classes [N]."""

    ids: list
    samples: list
    questions: list | None
    labels: torch.Tensor

    def images(self, idx: list[int]) -> list:
        return [s.image if s.image is not None else s.load_image() for s in (self.samples[i] for i in idx)]

    @classmethod
    def from_samples(cls, samples: Sequence, task, name: str) -> _Queries:
        if task.is_multilabel or not task.has_label_set:
            raise ValueError(f"task: stage 2 needs a single-label task with a label set, got {task.name!r} "
                             f"({task.kind}); multi-label gold answers need the answer-string scorer")
        if len(samples) == 0:
            raise ValueError(f"{name}: expected at least one sample, got none")
        ids, questions, labels = [], [], []
        for i, s in enumerate(samples):
            for attr in ("id", "answer", "image", "load_image"):
                if not hasattr(s, attr):
                    raise TypeError(f"{name}[{i}]: expected a jomed_fast.data.Sample, got {type(s).__name__}")
            ids.append(str(s.id))
            questions.append(getattr(s, "question", None))
            label = s.label if s.label is not None else task.encode_answer(s.answer)
            if not isinstance(label, int):
                raise TypeError(f"{name}[{i}]: expected a single class index as label, got {label!r}")
            labels.append(label)
        if len(set(ids)) != len(ids):
            raise ValueError(f"{name}: sample ids must be unique (they key the score cache)")
        qs = None if all(q is None for q in questions) else questions
        return cls(ids, list(samples), qs, torch.tensor(labels, dtype=torch.long))

    def __len__(self) -> int:
        return len(self.ids)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps([self.ids, self.labels.tolist()]).encode()).hexdigest()


def _params_digest(tensors) -> str:
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ core
@dataclasses.dataclass(frozen=True)
class Partner:
    """The other head as inference runs it: its query ``encoder`` (a ``QueryEncoder``, or a base
    encoder with ``encode_images``; frozen here) and how many candidates ``k`` it brings."""

    encoder: Any
    k: int

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"partner.k: expected an int >= 1, got {self.k!r}")
        if not (isinstance(self.encoder, QueryEncoder) or hasattr(self.encoder, "encode_images")):
            raise TypeError(f"partner.encoder: expected a QueryEncoder or an encoder with encode_images, "
                            f"got {type(self.encoder).__name__}")

    @torch.no_grad()
    def embed(self, images: list) -> torch.Tensor:
        if isinstance(self.encoder, QueryEncoder):
            return self.encoder(images)
        return self.encoder.encode_images(images)


class _Stage2:
    """One head's training state: encoders, cache, scorer, optimizer (built by ``train_retriever``)."""

    def __init__(self, config, encoder: QueryEncoder, retrieval, pairs: PairScores, partner: Partner | None = None):
        self.config = config
        self.encoder = encoder
        self.partner = partner
        self.retrieval = retrieval
        self.pairs = pairs
        self.candidate_encoder = copy.deepcopy(encoder.learned).eval().requires_grad_(False)
        trainable = [(n, p) for n, p in encoder.learned.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("retriever: no trainable parameters (n_trainable = 0?)")
        self.trainable = dict(trainable)
        cand = dict(self.candidate_encoder.named_parameters())
        self.params = {f"learned.{n}": p for n, p in trainable}
        self.params.update({f"candidate_encoder.{n}": cand[n] for n, _ in trainable})
        self.frozen_digest = _params_digest(
            [(n, p) for n, p in encoder.learned.named_parameters() if not p.requires_grad]
            + [(f"anchor.{n}", p) for n, p in encoder.frozen.named_parameters()])

    def refresh(self) -> None:
        """Copy the learned encoder into the candidate encoder (the reference's base-retriever update)."""
        with torch.no_grad():
            self.candidate_encoder.load_state_dict(self.encoder.learned.state_dict())

    def batch(self, queries: _Queries, idx: list[int]):
        """Reader gold log-likelihoods ``r [B, K]``, candidate embeddings ``e [B, K, D]``, the B images."""
        cfg = self.config
        images = queries.images(idx)
        with torch.no_grad():
            qc = self.candidate_encoder.encode_images(images)
        kt, ki = (cfg.k, 0) if cfg.head == "text" else (0, cfg.k)
        got = self.retrieval.search(qc, k_text=kt, k_image=ki)
        cand_ids = [[str(c.id) for c in row] for row in got.candidates]
        rows = self.pairs.rows([queries.ids[i] for i in idx], images,
                               None if queries.questions is None else [queries.questions[i] for i in idx],
                               cand_ids, got.candidates)
        r = gold_log_likelihoods(rows, queries.labels[idx])
        e = self.retrieval.embeddings(cfg.head, got.ids)
        return r, e, images

    def train_mode(self, on: bool) -> None:
        """Train mode for the learned encoder only; the mixing anchor and candidate encoder stay in eval."""
        self.encoder.train(on)
        self.encoder.frozen.eval()
        self.candidate_encoder.eval()

    def query_embeddings(self, images: list) -> torch.Tensor:
        """``q̃ [B, D]``: the learned encoder mixed with the anchor (``QueryEncoder``), with grad."""
        return self.encoder(images)

    def fused_hits(self, queries: _Queries, idx: list[int], images: list, with_partner: bool = False) -> int:
        """How many of the queries ``idx`` are answered right by the head's top ``select_k`` under
        the trained (mixed) query embedding — with the partner head's top k when ``with_partner`` —
        fused by the paper rule (``softmax(s)``, tau 1)."""
        cfg = self.config
        other = "image" if cfg.head == "text" else "text"
        k = {cfg.head: cfg.select_k, other: 0}
        q = self.query_embeddings(images)
        if with_partner:
            k[other] = self.partner.k
            q = {cfg.head: q, other: self.partner.embed(images)}
        got = self.retrieval.search(q, k_text=k["text"], k_image=k["image"])
        rows = self.pairs.rows([queries.ids[i] for i in idx], images,
                               None if queries.questions is None else [queries.questions[i] for i in idx],
                               [[str(c.id) for c in row] for row in got.candidates], got.candidates)
        fused = ops.fuse_candidates(rows, got.scores.to(rows.dtype), 1.0)
        return int((fused.argmax(-1) == queries.labels[idx]).sum())


@torch.no_grad()
def evaluate_retriever(stage: _Stage2, queries: _Queries) -> dict:
    """KL (paper target, config temperatures), top-1 agreement, the head-only fused accuracy and,
    with a partner, the system accuracy (``_Stage2.fused_hits``), averaged over the queries."""
    cfg = stage.config
    stage.train_mode(False)
    kl_sum, agree_sum, hits, system_hits = 0.0, 0, 0, 0
    for idx in epoch_batches(list(range(len(queries))), cfg.batch_size):
        r, e, images = stage.batch(queries, idx)
        s = retriever_scores(stage.query_embeddings(images), e)
        kl_sum += float(ops.retrieval_kl_loss(s, r, cfg.tau_retriever, cfg.tau_reader, reduction="sum"))
        agree_sum += int(top1_agreement(s, r).sum())
        hits += stage.fused_hits(queries, idx, images)
        if stage.partner is not None:
            system_hits += stage.fused_hits(queries, idx, images, with_partner=True)
    n = len(queries)
    out = {"kl": kl_sum / n, "agreement": agree_sum / n, "accuracy": hits / n, "queries": n}
    if stage.partner is not None:
        out["system_accuracy"] = system_hits / n
    return out


@dataclasses.dataclass
class RetrieverTrainResult:
    """What a stage-2 run did: steps, per-epoch records, first/last evaluation, cache statistics."""

    run_dir: str
    head: str
    steps: int
    total_steps: int
    epochs: list
    initial_eval: dict | None
    final_eval: dict | None
    cache: dict
    checkpoint: str | None
    selected: dict | None = None  # {"epoch", "metric", "accuracy"} the weights kept (select="best_val_accuracy")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _new_epoch_record() -> dict:
    return {"steps": 0, "seconds": 0.0, "reader_seconds": 0.0, "reader_calls": 0, "hits": 0, "misses": 0,
            "loss_sum": 0.0, "agree_sum": 0, "queries": 0, "resumed": False}


def _close_epoch(rec: dict, epoch: int, ev: dict | None) -> dict:
    out = {"epoch": epoch, **{k: rec[k] for k in ("steps", "seconds", "reader_seconds", "reader_calls", "hits",
                                                    "misses", "resumed")}}
    lookups = rec["hits"] + rec["misses"]
    out["hit_rate"] = rec["hits"] / lookups if lookups else None
    out["train_loss"] = rec["loss_sum"] / max(1, rec["steps"])
    out["train_agreement"] = rec["agree_sum"] / max(1, rec["queries"])
    out["eval"] = ev
    return out


def _postfix(loss, agreement: float, hit_rate, history: list) -> dict:
    last = history[-1]["eval"] if history and history[-1]["eval"] else {}
    out = {"loss": f"{float(loss.detach()):.4f}", "agree": f"{agreement:.2f}",
           "hit": "-" if hit_rate is None else f"{hit_rate:.2f}"}
    if last:
        out["eval_kl"] = f"{last['kl']:.4f}"
    return out


class _Best:
    """Model selection on validation (``select="best_val_accuracy"``): the weights of the epoch with
    the highest system accuracy (head-only without a partner; step 0 included; the earlier epoch
    wins ties) are kept as the named checkpoint ``best`` (so a resumed run still has them) and
    restored at the end."""

    NAME = "best"

    def __init__(self, run_dir: Path, stage: _Stage2, opt, on: bool):
        self.run_dir, self.stage, self.opt, self.on = run_dir, stage, opt, on
        self.path = Path(run_dir) / CHECKPOINT_DIR / self.NAME

    def current(self) -> dict | None:
        if not self.path.is_dir():
            return None
        return json.loads((self.path / STATE_JSON).read_text())["extra"]["selected"]

    def offer(self, epoch: int, step: int, ev: dict | None) -> None:
        if not self.on or ev is None:
            return
        metric = "system_accuracy" if "system_accuracy" in ev else "accuracy"
        now = self.current()
        if now is None or ev[metric] > now["accuracy"]:
            save_named(self.run_dir, self.NAME, step, params=self.stage.params, optimizer=self.opt,
                       extra={"selected": {"epoch": epoch, "metric": metric, "accuracy": ev[metric]}})

    def restore(self) -> dict | None:
        if not self.on:
            return None
        load_checkpoint(self.path, params=self.stage.params)
        return self.current()


def _check_inputs(retriever, retrieval, config) -> QueryEncoder:
    if isinstance(retriever, QueryEncoder):
        return retriever
    if not (hasattr(retriever, "encode_images") and hasattr(retriever, "image_layers")):
        raise TypeError(f"retriever: expected a QueryEncoder or a base encoder with encode_images / image_layers, "
                        f"got {type(retriever).__name__}")
    for attr in ("search", "embeddings", "index"):
        if not hasattr(retrieval, attr):
            raise TypeError(f"retrieval: expected a jomed_fast.retrieval.Retrieval, got {type(retrieval).__name__}")
    return QueryEncoder(retriever, config.n_trainable, config.alpha)


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_via(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def _prepare_run_dir(run_dir: Path, config: RetrieverTrainConfig, resume: bool) -> Path | None:
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None and not resume:
        raise ValueError(f"run_dir: {str(run_dir)!r} already holds a run (checkpoint {ckpt.name}); pass resume=True "
                         "to continue it or choose another run_dir")
    saved = run_dir / CONFIG_FILE
    if ckpt is not None and saved.is_file():
        diffs = config.resume_differences(json.loads(saved.read_text()))
        if diffs:
            raise ValueError(f"config: options {diffs} differ from the run being resumed in {str(run_dir)!r}")
    _write_json(saved, config.to_dict())
    return ckpt


def train_retriever(config: RetrieverTrainConfig, reader, task, retriever, retrieval, train: Sequence,
                    val: Sequence | None = None, run_dir: str = "runs/stage2", *, resume: bool = True,
                    progress: bool = True, scorer=None, partner: Partner | None = None) -> RetrieverTrainResult:
    """Train one retriever head by Sharp Perplexity Distillation (see the module docstring).

    Args:
        config: a :class:`RetrieverTrainConfig` (or a dict of its options).
        reader: a frozen ``jomed_fast.readers.Reader`` (put in eval mode; never updated).
        task: a ``jomed_fast.tasks.Task`` or its name (single label).
        retriever: a ``QueryEncoder`` or a base encoder (wrapped in ``QueryEncoder(base,
            config.n_trainable, config.alpha)``); trained **in place**. On resume pass the same
            initial encoder: the checkpoint restores the trainable layers (the frozen ones are
            checked against the run's digest).
        retrieval: ``jomed_fast.retrieval.Retrieval`` over the index (its embeddings stay fixed).
        train / val: ``Sample`` lists (ids unique; they key the score cache). Metrics use ``val``,
            or the training queries when it is None.
        run_dir: checkpoints, ``config.json``, ``result.json`` and (unless ``config.cache_path``)
            the score cache ``score_cache.bin``.
        resume: continue the run in ``run_dir`` when it has a checkpoint (False: refuse to touch it).
        progress: a tqdm bar with loss, KL, agreement and cache hit rate.
        scorer: a ``CandidateScorer`` to use (default: built from reader, task and the config).
        partner: the other head as inference runs it (:class:`Partner`); the evaluations then
            report the system accuracy, and selection uses it. It is not part of the resume
            check: resume with the same partner.
    """
    from ..scoring import CandidateScorer
    from ..tasks import get_task

    if isinstance(config, dict):
        config = RetrieverTrainConfig.from_dict(config)
    if not isinstance(config, RetrieverTrainConfig):
        raise TypeError(f"config: expected a RetrieverTrainConfig or a dict, got {type(config).__name__}")
    config.validate()
    task = get_task(task) if isinstance(task, str) else task
    encoder = _check_inputs(retriever, retrieval, config)
    if config.k > retrieval.index.count:
        raise ValueError(f"config.k: expected at most the index size {retrieval.index.count}, got {config.k}")
    queries = _Queries.from_samples(train, task, "train")
    eval_queries = _Queries.from_samples(val, task, "val") if val is not None else queries
    run_dir = Path(run_dir)
    ckpt = _prepare_run_dir(run_dir, config, resume)

    reader.eval()
    if scorer is None:
        scorer = CandidateScorer(reader, task, config.layout, memory_budget=config.memory_budget,
                                 class_mode=config.class_mode, normalize=config.sequence_normalize)
    cache = ScoreCache(config.cache_path or run_dir / CACHE_FILE)
    try:
        ns = (reader_fingerprint(reader), task.name, scoring_layout(scorer))
        stage = _Stage2(config, encoder, retrieval, PairScores(scorer, cache, ns), partner)
        return _run(stage, queries, eval_queries, run_dir, ckpt, progress)
    finally:
        cache.close()


def _run(stage: _Stage2, queries: _Queries, eval_queries: _Queries, run_dir: Path, ckpt: Path | None,
         progress: bool) -> RetrieverTrainResult:
    cfg = stage.config
    n_batches = batches_per_epoch(len(queries), cfg.batch_size)
    total = cfg.epochs * n_batches if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * n_batches)
    opt = torch.optim.AdamW(list(stage.trainable.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _WarmupStepsCosine(total, cfg.warmup_steps))
    step, epoch, position = 0, 0, 0
    history: list = []
    initial_eval = None
    rec = _new_epoch_record()
    digest = {"queries": queries.digest(), "frozen": stage.frozen_digest}
    if ckpt is not None:
        state = load_checkpoint(ckpt, params=stage.params, optimizer=opt, scheduler=sched)
        extra = state["extra"]
        if extra.get("digest") != digest:
            raise ValueError(f"run_dir: the run in {str(run_dir)!r} used other training queries or another initial "
                             "retriever (digest mismatch); pass the same inputs or start a new run_dir")
        step, epoch, position = state["step"], state["data"]["epoch"], state["data"]["position"]
        history, initial_eval, rec = extra["history"], extra["initial_eval"], extra["epoch_partial"]
        rec["resumed"] = rec["resumed"] or position > 0
    elif cfg.eval_each_epoch:
        initial_eval = evaluate_retriever(stage, eval_queries)
    last_ckpt = str(ckpt) if ckpt is not None else None
    best = _Best(run_dir, stage, opt, cfg.select == "best_val_accuracy")
    if ckpt is None:
        best.offer(0, step, initial_eval)

    def save() -> str:
        return str(save_checkpoint(
            run_dir, step, params=stage.params, optimizer=opt, scheduler=sched,
            data={"epoch": epoch, "position": position},
            extra={"history": history, "initial_eval": initial_eval, "epoch_partial": rec, "digest": digest},
            keep=cfg.keep_checkpoints))

    cache = stage.pairs.cache
    bar = tqdm(total=total, initial=step, desc=f"stage 2 ({cfg.head} head)", disable=not progress)
    try:
        while step < total:
            order = epoch_order(len(queries), cfg.seed, epoch, cfg.shuffle)
            batches = epoch_batches(order, cfg.batch_size)
            while position < len(order) and step < total:
                idx = batches[position // cfg.batch_size]
                t0 = time.perf_counter()
                h0, m0, s0, c0 = cache.stats.hits, cache.stats.misses, cache.stats.reader_seconds, \
                    stage.pairs.reader_calls
                stage.train_mode(True)
                r, e, images = stage.batch(queries, idx)
                s = retriever_scores(stage.query_embeddings(images), e)
                loss = distillation_loss(s, r, cfg)
                check_finite(loss, step + 1, last_ckpt)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(list(stage.trainable.values()), cfg.grad_clip)
                opt.step()
                sched.step()
                step += 1
                position += len(idx)
                if cfg.refresh_on and step % cfg.refresh_every == 0:
                    stage.refresh()
                agree = int(top1_agreement(s.detach(), r).sum())
                rec["steps"] += 1
                rec["seconds"] += time.perf_counter() - t0
                rec["reader_seconds"] += cache.stats.reader_seconds - s0
                rec["reader_calls"] += stage.pairs.reader_calls - c0
                rec["hits"] += cache.stats.hits - h0
                rec["misses"] += cache.stats.misses - m0
                rec["loss_sum"] += float(loss.detach())
                rec["agree_sum"] += agree
                rec["queries"] += len(idx)
                bar.update(1)
                bar.set_postfix(_postfix(loss, agree / len(idx), cache.stats.hit_rate, history))
                if position >= len(order):
                    ev = evaluate_retriever(stage, eval_queries) if cfg.eval_each_epoch else None
                    history.append(_close_epoch(rec, epoch + 1, ev))
                    best.offer(epoch + 1, step, ev)
                    epoch, position, rec = epoch + 1, 0, _new_epoch_record()
                if step % cfg.checkpoint_every == 0 or step == total:
                    last_ckpt = save()
    finally:
        bar.close()
    if position > 0:  # stopped by max_steps mid-epoch: close the partial epoch's record
        ev = evaluate_retriever(stage, eval_queries) if cfg.eval_each_epoch else None
        history.append(_close_epoch(rec, epoch + 1, ev))
        best.offer(epoch + 1, step, ev)
        rec = _new_epoch_record()
    final_eval = history[-1]["eval"] if history else initial_eval
    result = RetrieverTrainResult(run_dir=str(run_dir), head=cfg.head, steps=step, total_steps=total,
                                  epochs=history, initial_eval=initial_eval, final_eval=final_eval,
                                  cache=cache.stats.to_dict(), checkpoint=last_ckpt, selected=best.restore())
    _write_json(run_dir / RESULT_FILE, result.to_dict())
    return result


@dataclasses.dataclass
class HeadsResult:
    """``train_retriever_heads``' outcome: each head's run and the trained per-head query encoders."""

    text: RetrieverTrainResult
    image: RetrieverTrainResult
    encoders: HeadEncoders

    def results(self) -> dict:
        return {"text": self.text, "image": self.image}


def train_retriever_heads(config: RetrieverTrainConfig, reader, task, retriever, retrieval, train: Sequence,
                          val: Sequence | None = None, run_dir: str = "runs/stage2", *, resume: bool = True,
                          progress: bool = True, image_config: RetrieverTrainConfig | None = None) -> HeadsResult:
    """Both heads, as the reference: the text head (``run_dir/text``), then the image head
    (``run_dir/image``), each its own query encoder started from ``retriever`` (the *base* encoder,
    which is not changed) and mixed with it (``alpha``); see ``retriever.heads``.

    ``image_config`` (default: ``config`` with ``head="image"``) may change options of the second
    run. One score cache (``run_dir/score_cache.bin``, unless ``config.cache_path``) serves both heads.
    """
    if isinstance(retriever, QueryEncoder):
        raise TypeError("retriever: expected the base encoder (each head builds its own QueryEncoder), got a QueryEncoder")
    if isinstance(config, dict):
        config = RetrieverTrainConfig.from_dict(config)
    root = Path(run_dir)
    cache_path = config.cache_path or str(root / CACHE_FILE)
    configs = {"text": config.replace(head="text", cache_path=cache_path),
               "image": (image_config or config).replace(head="image", cache_path=cache_path)}
    encoders, results = {}, {}
    # each head is evaluated (and selected) in the system it will serve in: the text head beside the
    # base image head, the image head beside the text head as selected
    partners = {"text": lambda: Partner(retriever, configs["image"].select_k),
                "image": lambda: Partner(encoders["text"].eval(), configs["text"].select_k)}
    for head, cfg in configs.items():
        encoders[head] = QueryEncoder(copy.deepcopy(retriever), cfg.n_trainable, cfg.alpha)
        results[head] = train_retriever(cfg, reader, task, encoders[head], retrieval, train, val, root / head,
                                        resume=resume, progress=progress, partner=partners[head]())
    return HeadsResult(text=results["text"], image=results["image"], encoders=HeadEncoders(**encoders))
