r"""The training loop both stages run: the run directory and its identity, one data order, the
step / evaluate / select / checkpoint cycle, and exact resume.

A stage (:class:`Stage`) supplies only what is its own: the parameters, the loss of one step (its
batches and forward / backward), and what happens after a step (its metrics, its evaluation). The
loop owns the rest, in this order for every optimizer step::

    DataOrder.next_step ─► Stage.step_loss (forward + backward of grad_accum micro-batches)
    check_finite ─► clip ─► AdamW ─► warm-up + cosine LR ─► position advances
    Stage.after_step ─► an Offer (value, record) ─► Selection keeps checkpoints/best
    every checkpoint_every steps and at the last: checkpoints/step-N (weights, AdamW, LR, RNG,
    data position, the stage's JSON log, the best so far)

History: ``log.jsonl`` gets a line per step (every ``log_every``) and per evaluation, and
TensorBoard the same scalars with ``report_to="tensorboard"`` (:mod:`.run_log`, which says every
field); a resume first drops the lines past its checkpoint.

SIGTERM (pre-emption): the step under way finishes, a checkpoint is written (unless that step
just wrote one), the log is flushed and :class:`~.preemption.StoppedBySignal` is raised; a rerun
resumes exactly. The handler is installed for the run only (:mod:`.preemption`).

Run directory: ``identity.json`` (what decides the result: the inputs' content digests and every
option that changes results, :mod:`jomed_fast.identity`), written when the run starts; a resume
whose inputs differ is refused with :class:`~jomed_fast.identity.IdentityMismatch` naming them
(``config.lr``, ``train``, ``reader``, ``index``, ...). ``config.json`` (every option, for people),
``checkpoints/`` (``step-*``, ``best``, ``LATEST``), ``log.jsonl`` (and ``tensorboard/``), ``result.json``.

Exact resume: the data order of epoch e is a pure function of (seed, e) (:mod:`.data_order`), so
the checkpoint's ``(epoch, position)`` and RNG states put a resumed run in the state it had (bitwise
on CPU; SIGKILL-tested by both stages).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch

from ..data.io import atomic_write_json
from ..identity import IdentityMismatch, check_identity, json_digest, read_identity, write_identity
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_named
from .data_order import DataOrder, steps_per_epoch
from .guards import check_finite
from .preemption import StopOnSignal, StoppedBySignal
from .run_log import RunLog
from .schedule import warmup_cosine

__all__ = [
    "BEST",
    "CONFIG_FILE",
    "IDENTITY_FILE",
    "RESULT_FILE",
    "LoopOptions",
    "Offer",
    "RunState",
    "Stage",
    "StoppedBySignal",
    "encoder_fingerprint",
    "open_run",
    "options_identity",
    "retrieval_identity",
    "run_loop",
    "write_result",
]

IDENTITY_FILE = "identity.json"
CONFIG_FILE = "config.json"
RESULT_FILE = "result.json"
BEST = "best"


# ------------------------------------------------------------------------------------------ identity
def options_identity(config, resume_free: tuple[str, ...]) -> dict:
    """``{"config.<option>": value}`` for every option of ``config`` except ``resume_free`` (the
    ones that cannot change a result), so a mismatch names the option."""
    return {f"config.{k}": v for k, v in sorted(config.to_dict().items()) if k not in resume_free}


def encoder_fingerprint(encoder) -> str | None:
    """The content of a retriever encoder's weights (``.fingerprint()``); a ``QueryEncoder``: its
    learned and frozen towers, ``alpha`` and ``n_trainable``; ``None``: no encoder."""
    if encoder is None:
        return None
    own = getattr(encoder, "fingerprint", None)
    if callable(own):
        return own()
    if all(hasattr(encoder, a) for a in ("learned", "frozen", "alpha", "n_trainable")):
        return json_digest(
            {
                "learned": encoder_fingerprint(encoder.learned),
                "alpha": encoder.alpha,
                "frozen": encoder_fingerprint(encoder.frozen),
                "n_trainable": encoder.n_trainable,
            }
        )
    raise TypeError(
        f"encoder: expected a retriever encoder with fingerprint() or a QueryEncoder, got {type(encoder).__name__}"
    )


def retrieval_identity(retrieval, encoder) -> dict:
    """``{"index", "encoder", "exclusion"}``: the index's content (``Index.digest()`` and its
    records' content), the query encoder's weights and which index rows a query's search leaves
    out as the query itself (``Retrieval.exclusion``); all ``None`` without retrieval (reader only
    is an input value)."""
    if retrieval is None:
        return {"index": None, "encoder": None, "exclusion": None}
    from ..data.records import records_digest

    index = json_digest({"index": retrieval.index.digest(), "records": records_digest(retrieval.records)})
    return {"index": index, "encoder": encoder_fingerprint(encoder), "exclusion": retrieval.exclusion.identity()}


# ------------------------------------------------------------------------------------------ run dir
def open_run(run_dir, identity: Mapping[str, Any], options: dict, resume: bool) -> Path | None:
    """Prepare ``run_dir`` and return the checkpoint to resume from (None: a fresh run).

    A fresh run writes ``identity.json``; a run with a checkpoint resumes only with ``resume`` and
    only when ``identity`` equals the stored one (else ``IdentityMismatch`` naming what changed).
    ``config.json`` gets ``options`` either way."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None and not resume:
        raise ValueError(
            f"run_dir: {str(run_dir)!r} already holds a run (checkpoint {ckpt.name}); pass "
            "resume=True to continue it, or choose another run_dir"
        )
    where = f"run_dir {str(run_dir)!r}"
    if ckpt is None:
        write_identity(run_dir / IDENTITY_FILE, identity)
    else:
        stored = read_identity(run_dir / IDENTITY_FILE)
        if stored is None:
            raise IdentityMismatch(
                f"{where}: holds checkpoints but no {IDENTITY_FILE}, so what they were trained "
                "from cannot be checked; start a new run_dir"
            )
        check_identity(stored, identity, where)
    atomic_write_json(run_dir / CONFIG_FILE, options)
    return ckpt


def write_result(run_dir, result: dict) -> None:
    atomic_write_json(Path(run_dir) / RESULT_FILE, result)


# ------------------------------------------------------------------------------------------ state
@dataclasses.dataclass
class RunState:
    """What a checkpoint restores: the step, the data position (``epoch``, examples of it already
    seen), the stage's JSON ``log`` (curves, per-epoch records) and the ``best`` offer so far
    (``{"step", "value", "record"}``); plus the paths of this process's checkpoints."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    log: dict = dataclasses.field(default_factory=dict)
    best: dict | None = None
    last_checkpoint: Path | None = None
    resumed_from: Path | None = None


class Offer(NamedTuple):
    """An evaluation of the stage: the ``value`` selection compares, the JSON ``record`` kept with
    it (the result's ``selected``) and the ``metrics`` its ``eval`` line of the log gets."""

    value: float
    record: dict
    metrics: dict | None = None


class Stage(Protocol):
    """What a stage supplies to :func:`run_loop`."""

    desc: str  # the progress bar's label
    params: dict[str, torch.Tensor]  # what a checkpoint holds, by name
    trainable: list[torch.Tensor]  # what AdamW updates (and clipping bounds)

    def start(self, state: RunState, resumed: bool) -> Offer | None:
        """Before the first step of this process (a fresh run may evaluate step 0 here)."""

    def step_loss(self, batches: list[list[int]], state: RunState) -> float:
        """Forward and backward of one step's micro-batches (example indices); the step's loss."""

    def after_step(self, state: RunState, loss: float, seconds: float, epoch_ended: bool, last: bool) -> Offer | None:
        """After the optimizer step (``state`` already advanced): metrics, evaluation."""

    def postfix(self, state: RunState, loss: float) -> dict:
        """The progress bar's fields."""


@dataclasses.dataclass(frozen=True)
class LoopOptions:
    """The loop's settings (each stage maps its config onto them).

    ``n`` examples per epoch; a step is ``grad_accum`` micro-batches of ``batch_size``; ``select``:
    ``"min"`` / ``"max"`` keeps the offer with the lowest / highest value (the earlier wins ties) as
    ``checkpoints/best``, ``None`` keeps none; ``log_every`` / ``report_to``: the log's cadence and
    whether TensorBoard gets it too (:mod:`.run_log`)."""

    n: int
    batch_size: int
    epochs: int
    lr: float
    weight_decay: float
    seed: int
    checkpoint_every: int
    keep: int
    grad_accum: int = 1
    max_steps: int | None = None
    shuffle: bool = True
    warmup_ratio: float = 0.0
    warmup_steps: int | None = None
    max_grad_norm: float | None = None
    select: str | None = None
    log_every: int = 1
    report_to: str = "none"

    @property
    def total_steps(self) -> int:
        full = self.epochs * steps_per_epoch(self.n, self.batch_size, self.grad_accum)
        return full if self.max_steps is None else min(full, self.max_steps)


# ------------------------------------------------------------------------------------------ loop
class _Loop:
    """Optimizer, schedule, data order, checkpoints and log of one run of ``stage``."""

    def __init__(self, stage: Stage, opts: LoopOptions, run_dir: Path):
        self.stage, self.opts, self.run_dir = stage, opts, run_dir
        self.total = opts.total_steps
        self.optimizer = torch.optim.AdamW(stage.trainable, lr=opts.lr, weight_decay=opts.weight_decay)
        self.scheduler = warmup_cosine(self.optimizer, self.total, opts.warmup_ratio, opts.warmup_steps)
        self.order = DataOrder(opts.n, opts.seed, opts.shuffle)
        self.log: RunLog | None = None
        self.saved_step: int | None = None  # the step of this run's newest step checkpoint

    def _content(self, state: RunState) -> dict:
        return {
            "params": self.stage.params,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "data": {"epoch": state.epoch, "position": state.position},
            "extra": {"log": state.log, "best": state.best},
        }

    def save(self, state: RunState) -> None:
        state.last_checkpoint = save_checkpoint(self.run_dir, state.step, keep=self.opts.keep, **self._content(state))
        self.saved_step = state.step

    def restore(self, path: Path) -> RunState:
        saved = load_checkpoint(path, params=self.stage.params, optimizer=self.optimizer, scheduler=self.scheduler)
        data, extra = saved["data"], saved["extra"]
        self.saved_step = int(saved["step"])
        return RunState(
            step=int(saved["step"]),
            epoch=int(data["epoch"]),
            position=int(data["position"]),
            log=extra["log"],
            best=extra["best"],
            last_checkpoint=path,
            resumed_from=path,
        )

    def epochs_done(self, state: RunState) -> float:
        return state.epoch + state.position / self.opts.n

    def offer(self, state: RunState, offer: Offer | None) -> None:
        """Log ``offer``'s metrics; keep it as ``checkpoints/best`` when it beats the best so far."""
        if offer is None:
            return
        if offer.metrics is not None and self.log is not None:
            self.log.write("eval", state.step, self.epochs_done(state), offer.metrics)
        if self.opts.select is None:
            return
        best = state.best
        if best is not None and not (
            offer.value > best["value"] if self.opts.select == "max" else offer.value < best["value"]
        ):
            return
        state.best = {"step": state.step, "value": float(offer.value), "record": offer.record}
        save_named(self.run_dir, BEST, state.step, **self._content(state))

    def _grad_norm(self, logged: bool) -> float | None:
        """Clip to ``max_grad_norm``; the total norm before clipping (computed without clipping only
        when the step is logged: reading the gradients changes nothing)."""
        if self.opts.max_grad_norm:
            return float(torch.nn.utils.clip_grad_norm_(self.stage.trainable, self.opts.max_grad_norm))
        if not logged:
            return None
        grads = [p.grad for p in self.stage.trainable if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    def step(self, state: RunState) -> float:
        """One optimizer step; nothing is applied when its loss is not finite."""
        opts = self.opts
        batches = self.order.next_step(state.epoch, state.position, opts.batch_size, opts.grad_accum)
        examples = sum(len(b) for b in batches)
        last = state.step + 1 == self.total
        logged = self.log is not None and self.log.due(state.step + 1, last)
        t0 = time.perf_counter()
        loss = self.stage.step_loss(batches, state)
        check_finite(loss, state.step + 1, None if state.last_checkpoint is None else str(state.last_checkpoint))
        grad_norm = self._grad_norm(logged)
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        state.step += 1
        state.epoch, state.position, ended = self.order.advance(state.epoch, state.position, examples)
        if logged and self.log is not None:
            fields = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "examples": examples, "seconds": seconds}
            fields["examples_per_s"] = examples / seconds if seconds > 0 else None
            self.log.write("train", state.step, self.epochs_done(state), fields)
        self.offer(state, self.stage.after_step(state, loss, seconds, ended, last))
        if state.step % opts.checkpoint_every == 0 or last:
            self.save(state)
        return loss

    def stop(self, state: RunState, signum: int) -> None:
        """Checkpoint the step just done (unless it wrote one) and raise :class:`StoppedBySignal`."""
        if self.saved_step != state.step:
            self.save(state)
        raise StoppedBySignal(signum, state.step, self.total, state.last_checkpoint)


def run_loop(
    stage: Stage,
    opts: LoopOptions,
    run_dir,
    checkpoint: Path | None,
    *,
    progress: bool = True,
    on_step: Callable[[dict], None] | None = None,
) -> RunState:
    """Train ``stage`` to ``opts.total_steps``, from ``checkpoint`` when given (see the module docstring).

    ``on_step`` is called after every step with ``{"step", "loss", "lr", "epoch", "position"}``.
    Returns the final :class:`RunState`; the caller builds and writes its result. SIGTERM during
    the run raises :class:`StoppedBySignal` once the step under way is done and checkpointed."""
    from tqdm.auto import tqdm

    loop = _Loop(stage, opts, Path(run_dir))
    state = loop.restore(checkpoint) if checkpoint is not None else RunState()
    bar = None
    with (
        StopOnSignal() as stop,
        RunLog(run_dir, loop.saved_step, report_to=opts.report_to, log_every=opts.log_every) as loop.log,
    ):
        try:
            loop.offer(state, stage.start(state, resumed=checkpoint is not None))
            loop.optimizer.zero_grad(set_to_none=True)
            bar = tqdm(
                total=loop.total,
                initial=state.step,
                desc=stage.desc,
                unit="step",
                dynamic_ncols=True,
                disable=not progress,
            )
            while state.step < loop.total:
                if stop.requested:
                    loop.stop(state, stop.signum)
                loss = loop.step(state)
                bar.update(1)
                bar.set_postfix(stage.postfix(state, loss))
                if on_step is not None:
                    on_step(
                        {
                            "step": state.step,
                            "loss": loss,
                            "lr": loop.scheduler.get_last_lr()[0],
                            "epoch": state.epoch,
                            "position": state.position,
                        }
                    )
        finally:
            if bar is not None:
                bar.close()
            loop.optimizer.zero_grad(set_to_none=True)
    return state
