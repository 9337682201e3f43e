r"""Stage 2 of JOMED: retriever fine-tuning by Sharp Perplexity Distillation (reader frozen).

For a batch of B training queries (image :math:`x_b`, question, gold class :math:`a_b`):

1. **candidates** — the index returns the top K rows of the trained head (``text``: index
   captions, ``image``: index images; the other head brings nothing) for the *candidate query*:
   with ``candidate_query="mixed"`` (default) :math:`\mathrm{norm}(\alpha f_{stale}(x_b) +
   (1-\alpha) f_0(x_b))`, where :math:`f_{stale}` is the candidate encoder (a frozen copy of the
   learned query encoder, re-copied every ``refresh_every`` steps) and :math:`f_0` the frozen
   initial encoder — the reference's ``partial_encoding(base_retriever,
   passage_encoder_for_train)``, the same kind of query inference uses; ``"unmixed"``:
   :math:`f_{stale}(x_b)` alone (``HeadModel.candidate_queries``);
2. **reader posterior** — the frozen reader's class log-probabilities ``[B, K, C]``
   (``CandidateScorer``), through the exact score cache (:mod:`.score_cache`, :mod:`.pair_scores`:
   keyed by the reader's fingerprint and the query's and candidate's content),
   and their gold entries :math:`r_{b,k} = \log p_C(a_b \mid z_k, q_b)` ``[B, K]`` — for a
   multi-label task the reader's restricted likelihood of the gold label *set*,
   :math:`r_{b,k} = \log p(S_b \mid z_k, q_b)` (``scoring.label_set_head``);
3. **retriever scores** — :math:`s_{b,k} = \tilde q_b \cdot e_k` with the trainable query embedding
   :math:`\tilde q_b = \mathrm{norm}(\alpha\, f_\theta(x_b) + (1-\alpha)\, f_0(x_b)) \in \mathbb{R}^D`
   (``retriever.QueryEncoder``: :math:`f_0` is the frozen initial encoder, never refreshed, as the
   reference's ``passage_encoder_for_train``) and the fixed index embeddings
   :math:`e_k \in \mathbb{R}^D` of the candidates (``Retrieval.embeddings``);
4. **loss** — ``ops.retrieval_kl_loss(s, t, tau_retriever, tau_reader)``
   :math:`= \frac1B \sum_b \mathrm{KL}(\mathrm{softmax}(t_b/\tau_{reader}) \,\|\,
   \mathrm{softmax}(s_b/\tau_{retriever}))` with target logits :math:`t = r` (``target="gold"``,
   the paper) or one of the other ``retriever_loss.TARGETS`` (the authors' code's double-softmax
   gold, with or without the retriever's detached log-prior: ``--add_prior_to_gold_score`` is
   ``"reference_double_softmax_gold_with_prior"``); AdamW on the last ``n_trainable`` image-tower
   layers, linear warm-up + cosine decay.

Metrics (per epoch, on ``val`` or else the training queries, candidates from the current
candidate query): the KL above with the paper's target, the **top-1 agreement**
:math:`\frac1B\sum_b [\arg\max_k s_{b,k} = \arg\max_k r_{b,k}]` — how often the retriever's first
choice is the reader's — and the **head-only accuracy**: the head's top ``select_k`` under the
trained query embedding, fused by the paper's rule. Given a ``partner`` (the other head as
inference will run it: its query encoder and its k), also the **system accuracy**: the head's top
``select_k`` and the partner's top k, fused together, which is what the deployed retriever scores.
``select="best_val_accuracy"`` keeps the epoch (step 0 included) with the highest system accuracy
(head-only without a partner; checkpoint ``best``, restored at the end).

Diagnostics (:mod:`.retriever_diagnostics`): each epoch record's ``diagnostics`` (mean KL, target
and retriever entropy beside ``log K``, the reader-right share of the candidates, the gradient
norm), each evaluation's distinct records and per-class coverage, and the flat-target and
retrieval-collapse warnings (printed, and in ``RetrieverTrainResult.warnings``); ``run_dir/diagnostics.png``
draws them. With ``dedup_candidates`` the K candidates hold each caption (text head) or image
(image head) once (:mod:`.candidate_dedup`).

The loop, data order, checkpoints (trainable weights, the candidate encoder's copies of them,
AdamW, scheduler, RNG, data position, history) and exact resume are :mod:`.loop`'s, shared with
stage 1; this module supplies the step's batch and loss (:mod:`.retriever_loss`), the per-epoch
records and the evaluation. A non-finite loss raises :class:`~.guards.NonFiniteLossError` before
anything is applied; the last checkpoint stays. ``run_dir/identity.json`` holds what decides the
result — the reader (with its adapter), the task and scoring layout, the training and validation
samples' content, the index, the initial query encoder, the partner and every option but
``RESUME_FREE`` — and a resume with any of them changed is refused naming them. Each
evaluation is a line of ``run_dir/log.jsonl`` beside the steps' (:mod:`.run_log`); SIGTERM stops
the run after the step under way, checkpointed (:class:`~.preemption.StoppedBySignal`).

``train_retriever`` trains one head; :mod:`.retriever_heads` trains both, one after the other.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ..data.records import records_digest
from ..readers.fingerprint import reader_fingerprint
from ..readers.hf_reader import check_trained_layout
from ..retriever.dual import QueryEncoder
from .checkpoint import CHECKPOINT_DIR, load_checkpoint
from .loop import (
    BEST,
    LoopOptions,
    Offer,
    RunState,
    open_run,
    options_identity,
    retrieval_identity,
    run_loop,
    write_result,
)
from .pair_scores import PairScores, scoring_layout
from .retriever_config import RESUME_FREE, RetrieverTrainConfig
from .retriever_data import QuerySet
from .retriever_diagnostics import entropy, epoch_warnings, grad_norm
from .retriever_loss import distillation_loss, distillation_target, gold_kind, retriever_scores, top1_agreement
from .retriever_model import HeadModel, Partner, evaluate_retriever
from .score_cache import ScoreCache

__all__ = [
    "Partner",
    "RetrieverTrainConfig",
    "RetrieverTrainResult",
    "distillation_loss",
    "evaluate_retriever",
    "retriever_scores",
    "train_retriever",
]

CACHE_FILE = "score_cache.bin"
DIAGNOSTICS_PNG = "diagnostics.png"


# ------------------------------------------------------------------------------------------ records
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
    warnings: list = dataclasses.field(default_factory=list)  # {"epoch", "kind", "message"} per warning
    excluded_self: dict | None = None  # index rows left out as the query itself, this call's searches
    dedup: dict | None = None  # copies left out of / kept in the training candidates, over the run

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_COUNTERS = (
    "steps",
    "seconds",
    "reader_seconds",
    "reader_calls",
    "hits",
    "misses",
    "dedup_removed",
    "dedup_kept",
    "excluded_self",
)
# per-step sums of the diagnostics (retriever_diagnostics), averaged at the epoch's end
_SUMS = ("target_entropy_sum", "retriever_entropy_sum", "grad_norm_sum", "reader_right_sum", "pairs", "k_sum")


def _new_epoch_record() -> dict:
    return {
        "steps": 0,
        "seconds": 0.0,
        "reader_seconds": 0.0,
        "reader_calls": 0,
        "hits": 0,
        "misses": 0,
        "dedup_removed": 0,
        "dedup_kept": 0,
        "excluded_self": 0,
        **dict.fromkeys(_SUMS, 0.0),
        "loss_sum": 0.0,
        "agree_sum": 0,
        "queries": 0,
        "resumed": False,
    }


def _close_epoch(rec: dict, epoch: int, ev: dict | None) -> dict:
    out = {"epoch": epoch, **{k: rec[k] for k in (*_COUNTERS, "resumed")}}
    lookups = rec["hits"] + rec["misses"]
    out["hit_rate"] = rec["hits"] / lookups if lookups else None
    out["train_loss"] = rec["loss_sum"] / max(1, rec["steps"])
    out["train_agreement"] = rec["agree_sum"] / max(1, rec["queries"])
    out["diagnostics"] = _diagnostics(rec)
    out["eval"] = ev
    return out


def _diagnostics(rec: dict) -> dict:
    """The epoch's mean diagnostics over its steps (:mod:`.retriever_diagnostics`)."""
    steps = rec["steps"]
    if not steps:
        return {}
    k = rec["k_sum"] / steps
    return {
        "kl": rec["loss_sum"] / steps,
        "target_entropy": rec["target_entropy_sum"] / steps,
        "retriever_entropy": rec["retriever_entropy_sum"] / steps,
        "log_k": math.log(k) if k > 0 else 0.0,
        "grad_norm": rec["grad_norm_sum"] / steps,
        "reader_right_share": rec["reader_right_sum"] / rec["pairs"] if rec["pairs"] else None,
    }


def _offer(epoch: int, ev: dict | None, record: dict | None = None) -> Offer | None:
    """Selection by the system accuracy (head-only without a partner). The log's ``eval`` line holds
    the evaluation and, from the epoch's ``record``, its training diagnostics (``train_`` before
    each name) and warnings."""
    if ev is None:
        return None
    metric = "system_accuracy" if "system_accuracy" in ev else "accuracy"
    metrics = dict(ev)
    if record is not None:
        metrics.update({f"train_{k}": v for k, v in record["diagnostics"].items()})
        metrics["warnings"] = [w["message"] for w in record["warnings"]]
    return Offer(ev[metric], {"epoch": epoch, "metric": metric, "accuracy": ev[metric]}, metrics)


# ------------------------------------------------------------------------------------------ stage
class _Stage2(HeadModel):
    """Stage 2 for :func:`.loop.run_loop`: one batch of queries per step, per-epoch records and
    evaluations (the log: ``history``, ``initial_eval``, ``epoch_partial``)."""

    def __init__(self, config, encoder, retrieval, pairs, queries: QuerySet, eval_queries: QuerySet, partner=None):
        super().__init__(config, encoder, retrieval, pairs, partner)
        self.queries, self.eval_queries = queries, eval_queries
        self.desc = f"stage 2 ({config.head} head)"
        self._step: dict = {}

    def _evaluate(self) -> dict | None:
        return evaluate_retriever(self, self.eval_queries) if self.config.eval_each_epoch else None

    def start(self, state: RunState, resumed: bool) -> Offer | None:
        if resumed:
            rec = state.log["epoch_partial"]
            rec["resumed"] = rec["resumed"] or state.position > 0
            return None
        state.log = {"history": [], "initial_eval": self._evaluate(), "epoch_partial": _new_epoch_record()}
        return _offer(0, state.log["initial_eval"])

    def _counters(self) -> dict:
        stats = self.pairs.cache.stats
        return {
            "hits": stats.hits,
            "misses": stats.misses,
            "reader_seconds": stats.reader_seconds,
            "reader_calls": self.pairs.reader_calls,
            "dedup_removed": self.dedup["removed"],
            "dedup_kept": self.dedup["kept"],
            "excluded_self": self.retrieval.excluded.records,
        }

    def step_loss(self, batches: list[list[int]], state: RunState) -> float:
        (idx,) = batches  # one batch per step (grad_accum 1)
        before = self._counters()
        self.train_mode(True)
        r, e, images = self.batch(self.queries, idx, gold_kind(self.config.target))
        s = retriever_scores(self.query_embeddings(images), e)
        cfg = self.config
        loss = distillation_loss(s, r, cfg)
        loss.backward()
        right = self.last_reader_right
        self._step = {
            "before": before,
            "agree": int(top1_agreement(s.detach(), r).sum()),
            "queries": len(idx),
            # gradients of this step alone: the loop zeroes them after every optimizer step
            "grad_norm_sum": grad_norm(self.trainable),
            "target_entropy_sum": float(entropy(distillation_target(s, r, cfg.target), cfg.tau_reader).mean()),
            "retriever_entropy_sum": float(entropy(s, cfg.tau_retriever).mean()),
            "reader_right_sum": int(right.sum()),
            "pairs": right.numel(),
            "k_sum": s.shape[1],
        }
        return float(loss.detach())

    def _record(self, rec: dict, loss: float, seconds: float) -> None:
        before = self._step["before"]
        for k, v in self._counters().items():
            rec[k] += v - before[k]
        rec["steps"] += 1
        rec["seconds"] += seconds
        rec["loss_sum"] += loss
        rec["agree_sum"] += self._step["agree"]
        rec["queries"] += self._step["queries"]
        for k in _SUMS:
            rec[k] += self._step[k]

    def after_step(self, state: RunState, loss: float, seconds: float, epoch_ended: bool, last: bool) -> Offer | None:
        """Refresh, the epoch's record; at an epoch's end (or the last step, mid-epoch) its evaluation."""
        cfg = self.config
        if cfg.refresh_on and state.step % cfg.refresh_every == 0:
            self.refresh()
        self._record(state.log["epoch_partial"], loss, seconds)
        if not (epoch_ended or (last and state.position > 0)):
            return None
        epoch = state.epoch if epoch_ended else state.epoch + 1
        ev = self._evaluate()
        record = _close_epoch(state.log["epoch_partial"], epoch, ev)
        record["warnings"] = self._warn(epoch, record, state.log["initial_eval"])
        state.log["history"].append(record)
        state.log["epoch_partial"] = _new_epoch_record()
        return _offer(epoch, ev, record)

    def _warn(self, epoch: int, record: dict, initial: dict | None) -> list[dict]:
        """The epoch's warnings (:func:`.retriever_diagnostics.epoch_warnings`), each printed as one line."""
        out = []
        for message in epoch_warnings(record["diagnostics"], record["eval"], initial, self.config):
            print(f"warning: stage 2 ({self.config.head} head), epoch {epoch}: {message}", file=sys.stderr)
            out.append({"epoch": epoch, "kind": message.split(":", 1)[0], "message": message})
        return out

    def postfix(self, state: RunState, loss: float) -> dict:
        history = state.log["history"]
        last = history[-1]["eval"] if history and history[-1]["eval"] else {}
        hit_rate = self.pairs.cache.stats.hit_rate
        out = {
            "loss": f"{loss:.4f}",
            "agree": f"{self._step['agree'] / self._step['queries']:.2f}",
            "hit": "-" if hit_rate is None else f"{hit_rate:.2f}",
        }
        if last:
            out["eval_kl"] = f"{last['kl']:.4f}"
        return out

    def result(self, state: RunState, run_dir: Path, total: int) -> RetrieverTrainResult:
        """The run's result; with selection on, the kept (best) weights are restored first."""
        log, selected = state.log, None
        if self.config.select != "last" and state.best is not None:
            load_checkpoint(run_dir / CHECKPOINT_DIR / BEST, params=self.params)
            selected = state.best["record"]
        final_eval = log["history"][-1]["eval"] if log["history"] else log["initial_eval"]
        return RetrieverTrainResult(
            run_dir=str(run_dir),
            head=self.config.head,
            steps=state.step,
            total_steps=total,
            epochs=log["history"],
            initial_eval=log["initial_eval"],
            final_eval=final_eval,
            cache=self.pairs.cache.stats.to_dict(),
            checkpoint=None if state.last_checkpoint is None else str(state.last_checkpoint),
            selected=selected,
            warnings=[w for e in log["history"] for w in e.get("warnings", [])],
            dedup=_dedup_totals(log),
        )


def _dedup_totals(log: dict) -> dict:
    """Copies left out of (``removed``) and kept in (``kept``: too few distinct rows) the training
    candidates, over every step of the run (resumed ones included)."""
    recs = [*log["history"], log["epoch_partial"]]
    return {"removed": sum(r.get("dedup_removed", 0) for r in recs), "kept": sum(r.get("dedup_kept", 0) for r in recs)}


# ------------------------------------------------------------------------------------------ entry
def _check_inputs(config, task, retriever, retrieval):
    """``(config, task, QueryEncoder)`` from what ``train_retriever`` was given, checked."""
    from ..tasks import get_task

    if isinstance(config, dict):
        config = RetrieverTrainConfig.from_dict(config)
    if not isinstance(config, RetrieverTrainConfig):
        raise TypeError(f"config: expected a RetrieverTrainConfig or a dict, got {type(config).__name__}")
    config.validate()
    task = get_task(task) if isinstance(task, str) else task
    if not isinstance(retriever, QueryEncoder):
        if not (hasattr(retriever, "encode_images") and hasattr(retriever, "image_layers")):
            raise TypeError(
                f"retriever: expected a QueryEncoder or a base encoder with encode_images / "
                f"image_layers, got {type(retriever).__name__}"
            )
        for attr in ("search", "embeddings", "index"):
            if not hasattr(retrieval, attr):
                raise TypeError(
                    f"retrieval: expected a jomed_fast.candidate_retrieval.Retrieval, got {type(retrieval).__name__}"
                )
        retriever = QueryEncoder(retriever, config.n_trainable, config.alpha)
    if config.k > retrieval.index.count:
        raise ValueError(f"config.k: expected at most the index size {retrieval.index.count}, got {config.k}")
    return config, task, retriever


def _scorer(reader, task, config: RetrieverTrainConfig):
    from ..scoring import CandidateScorer

    return CandidateScorer(
        reader,
        task,
        config.layout,
        memory_budget=config.memory_budget,
        class_mode=config.class_mode,
        normalize=config.sequence_normalize,
        max_labels=config.max_labels,
    )


def _identity(config, namespace: tuple, train, val, retrieval, encoder, partner) -> dict:
    """What decides a stage-2 result (``identity.json``): the reader, task and scoring layout (the
    cache namespace), the samples' content, the index, the initial query encoder, the partner and
    every option but ``RESUME_FREE``."""
    return {
        "reader": namespace[0],
        "task": namespace[1],
        "layout": namespace[2],
        "train": records_digest(train),
        "val": None if val is None else records_digest(val),
        **retrieval_identity(retrieval, encoder),
        "partner": None if partner is None else partner.fingerprint(),
        **options_identity(config, RESUME_FREE),
    }


def _loop_options(config: RetrieverTrainConfig, n: int) -> LoopOptions:
    return LoopOptions(
        n=n,
        batch_size=config.batch_size,
        epochs=config.epochs,
        max_steps=config.max_steps,
        lr=config.lr,
        weight_decay=config.weight_decay,
        seed=config.seed,
        shuffle=config.shuffle,
        warmup_steps=config.warmup_steps,
        max_grad_norm=config.grad_clip,
        checkpoint_every=config.checkpoint_every,
        keep=config.keep_checkpoints,
        select="max" if config.select == "best_val_accuracy" else None,
        log_every=config.log_every,
        report_to=config.report_to,
    )


def train_retriever(
    config: RetrieverTrainConfig,
    reader,
    task,
    retriever,
    retrieval,
    train: Sequence,
    val: Sequence | None = None,
    run_dir: str | Path = "runs/stage2",
    *,
    resume: bool = True,
    progress: bool = True,
    scorer=None,
    partner: Partner | None = None,
    on_step: Callable[[dict], None] | None = None,
) -> RetrieverTrainResult:
    """Train one retriever head by Sharp Perplexity Distillation (see the module docstring).

    Args:
        config: a :class:`RetrieverTrainConfig` (or a dict of its options).
        reader: a frozen ``jomed_fast.readers.Reader`` (put in eval mode; never updated).
        task: a ``jomed_fast.tasks.Task`` or its name (single label).
        retriever: a ``QueryEncoder`` or a base encoder (wrapped in ``QueryEncoder(base,
            config.n_trainable, config.alpha)``); trained **in place**. On resume pass the same
            initial encoder: the checkpoint restores the trainable layers.
        retrieval: ``jomed_fast.candidate_retrieval.Retrieval`` over the index (its embeddings stay fixed).
        train / val: ``Sample`` lists. Metrics use ``val``, or the training queries when it is None.
        run_dir: identity, config, checkpoints, result and the score cache (unless ``config.cache_path``).
        resume: continue the run in ``run_dir`` when it has a checkpoint (False: refuse to touch it);
            refused, naming them, when the inputs differ from the run's (``IdentityMismatch``).
        progress: a tqdm bar with loss, KL, agreement and cache hit rate.
        scorer: a ``CandidateScorer`` to use (default: built from reader, task and the config).
        partner: the other head as inference runs it (:class:`Partner`); the evaluations then
            report the system accuracy, and selection uses it.
        on_step: called after every optimizer step with ``{"step", "loss", "lr", "epoch", "position"}``.
    """
    config, task, encoder = _check_inputs(config, task, retriever, retrieval)
    queries = QuerySet.from_samples(train, task, "train")
    eval_queries = QuerySet.from_samples(val, task, "val") if val is not None else queries
    reader.eval()
    scorer = _scorer(reader, task, config) if scorer is None else scorer
    if scorer.layout != config.layout:
        raise ValueError(f"scorer: its layout {scorer.layout!r} differs from config.layout {config.layout!r}")
    check_trained_layout(reader, config.layout, "RetrieverTrainConfig.layout (stage 2)", config.allow_layout_mismatch)
    ns = (reader_fingerprint(reader), task.identity, scoring_layout(scorer))
    run_path = Path(run_dir)
    ckpt = open_run(run_path, _identity(config, ns, train, val, retrieval, encoder, partner), config.to_dict(), resume)
    cache = ScoreCache(config.cache_path or run_path / CACHE_FILE)
    excluded_before = retrieval.excluded.to_dict()
    try:
        stage = _Stage2(config, encoder, retrieval, PairScores(scorer, cache, ns), queries, eval_queries, partner)
        opts = _loop_options(config, len(queries))
        state = run_loop(stage, opts, run_path, ckpt, progress=progress, on_step=on_step)
        result = stage.result(state, run_path, opts.total_steps)
    finally:
        cache.close()
    result.excluded_self = {k: v - excluded_before[k] for k, v in retrieval.excluded.to_dict().items()}
    write_result(run_path, result.to_dict())
    write_diagnostics_chart({config.head: result.to_dict()}, run_path / DIAGNOSTICS_PNG)
    return result


def write_diagnostics_chart(runs: dict, path: Path) -> str:
    """``path``: the per-epoch diagnostics of ``runs`` (``{head: result dict}``) as a PNG."""
    from ..analysis.figures import save_png, stage2_diagnostics_chart

    heads = " and ".join(f"{h} head" for h in runs)
    return save_png(stage2_diagnostics_chart(runs, f"Stage 2 diagnostics per epoch ({heads})"), path)
