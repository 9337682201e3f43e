r"""Stage 1 of JOMED: retrieval-augmented fine-tuning of the reader (QLoRA), retriever frozen.

For each training sample :math:`(i_d, q_d, a)` and each of its K retrieved pairs
:math:`z_k = (i_k, t_k)` (reference: top 2 of the text head + top 2 of the image head), one example
minimises the answer's NLL given the augmented prompt:

.. math::
    \mathcal{L}(\theta) = \mathbb{E}_{(d, k)} \Big[ -\tfrac{1}{|a|} \textstyle\sum_j
        \log p_\theta(a_j \mid z_k \circ (i_d, q_d), a_{<j}) \Big]

(token mean over each optimizer step; see :mod:`.reader_loss`), :math:`\theta` the LoRA weights of
the NF4 reader. Without retrieval the same loop is the paper's "reader only" baseline.

One optimizer step (``S`` examples = ``batch_size * grad_accum``; B = ``batch_size``, L padded
length, H hidden, T answer tokens of the step)::

    EpochOrder ─► grad_accum micro-batches of B example ids
    ExampleSet.encode ─► input_ids [B, L], labels [B, L] (+ pixel inputs)
    reader.hidden_states ─► [B, L, H] ─► the [T_b, H] answer positions ─► LM head ─► NLL sum
    loss_b = NLL_b / T (T over the whole step) ─► backward (grads accumulate)
    check_finite ─► clip ─► AdamW ─► warm-up + cosine LR

Every ``eval_every`` steps the validation loss (answer-token mean over every validation example)
is measured and the best checkpoint is kept (``checkpoints/best``); every ``save_every`` steps and
at the end a resumable checkpoint (:mod:`.checkpoint`: LoRA weights by name, AdamW, scheduler,
RNGs, the data order's generator and position ``(epoch, index)``, the loss curves) is written
atomically, so ``resume=True`` continues bitwise exactly (CPU). A NaN/inf loss raises
:class:`~.guards.NonFiniteLossError` before anything is applied; the last checkpoint stays.

Files in ``run_dir``: ``config.json`` (the options; a resume with other options is refused),
``checkpoints/`` (``step-*``, ``best``, ``LATEST``), ``adapter/`` (the final LoRA adapter,
``load_reader(path, lora=run_dir / "adapter")``), ``result.json`` (curves, best, paths).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._profiling import stage
from ..data.io import atomic_write_json
from . import reader_loss as _loss
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_named
from .guards import check_finite
from .reader_config import ReaderTrainConfig
from .reader_data import EpochOrder, ExampleSet, balanced_indices, retrieve_candidates
from .schedule import warmup_cosine

__all__ = ["ReaderTrainConfig", "ReaderTrainResult", "train_reader", "validation_loss"]

CONFIG_FILE = "config.json"
RESULT_FILE = "result.json"
ADAPTER_DIR = "adapter"


@dataclass
class ReaderTrainResult:
    """What a stage-1 run produced.

    Attributes:
        train_loss: ``[(step, loss)]`` the loss of every optimizer step (token mean over the step).
        val_loss: ``[(step, loss)]`` validation losses (step 0: before training).
        best_val_loss / best_step: the lowest validation loss and its step (``checkpoints/best``).
        steps: optimizer steps run in total; examples: examples per epoch (train).
        run_dir, adapter_dir, best_checkpoint, last_checkpoint: paths.
        resumed_from: the checkpoint this process resumed from, if any.
        examples_per_second: training throughput of this process: examples over the seconds spent in
            training steps (encoding, forward, backward, optimizer; validation and checkpoints excluded).
    """

    train_loss: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)
    best_val_loss: float = math.inf
    best_step: int = -1
    steps: int = 0
    examples: int = 0
    run_dir: Path | None = None
    adapter_dir: Path | None = None
    best_checkpoint: Path | None = None
    last_checkpoint: Path | None = None
    resumed_from: Path | None = None
    examples_per_second: float = 0.0

    def to_dict(self) -> dict:
        out = dict(self.__dict__)
        for k, v in out.items():
            if isinstance(v, Path):
                out[k] = str(v)
        return out


# --------------------------------------------------------------------------------------------- checks
def _check_args(config, reader, task, train_samples, val_samples, retrieval, retriever) -> None:
    if not isinstance(config, ReaderTrainConfig):
        raise TypeError(f"config: expected a ReaderTrainConfig, got {type(config).__name__}")
    if not getattr(reader, "has_lora", False):
        raise ValueError("reader: expected a reader with a LoRA adapter (load_reader(..., lora=True)), got none")
    if not reader.trainable_parameters():
        raise ValueError("reader: its LoRA adapter has no trainable parameter (load it with lora_trainable=True)")
    if not hasattr(task, "format_answer") or not hasattr(task, "prompt"):
        raise TypeError(f"task: expected a jomed_fast.tasks.Task, got {type(task).__name__}")
    if not train_samples:
        raise ValueError("train_samples: expected at least one sample, got none")
    if not val_samples:
        raise ValueError("val_samples: expected at least one sample (validation picks the best checkpoint), got none")
    if (retrieval is None) != (retriever is None):
        raise ValueError("retrieval, retriever: expected both (retrieval-augmented) or neither (reader only), "
                         f"got retrieval={type(retrieval).__name__}, retriever={type(retriever).__name__}")


def _check_run_config(run_dir: Path, config: ReaderTrainConfig, resume: bool) -> None:
    """Write ``config.json``; a run resumed with other options would not be the same run, and a
    fresh run must not mix its checkpoints with an earlier run's."""
    path = run_dir / CONFIG_FILE
    if not resume and latest_checkpoint(run_dir) is not None:
        raise ValueError(f"run_dir: {str(run_dir)!r} holds the checkpoints of an earlier run; pass resume=True "
                         "to continue it, or give a new run_dir")
    if resume and path.is_file():
        saved = json.loads(path.read_text())
        now = json.loads(config.to_json())
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if diff and latest_checkpoint(run_dir) is not None:
            raise ValueError(f"config: run_dir {str(run_dir)!r} was started with other options ({diff}: "
                             f"{[saved.get(k) for k in diff]} there, {[now.get(k) for k in diff]} now); "
                             "use the same options to resume, or a new run_dir / resume=False")
    atomic_write_json(path, config.to_dict())


# --------------------------------------------------------------------------------------------- pieces
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _build_examples(config, task, train_samples, val_samples, retrieval, retriever) -> tuple[ExampleSet, ExampleSet]:
    train = list(train_samples)
    if config.class_balanced:
        train = [train[i] for i in balanced_indices(train, config.seed)]
    if retrieval is None:
        return ExampleSet(train, task, config.layout), ExampleSet(list(val_samples), task, config.layout)
    train_c, _ = retrieve_candidates(train, retrieval, retriever, config.k_text, config.k_image)
    val_c, _ = retrieve_candidates(list(val_samples), retrieval, retriever, config.k_text, config.k_image)
    return (ExampleSet(train, task, config.layout, train_c),
            ExampleSet(list(val_samples), task, config.layout, val_c))


def _total_steps(config: ReaderTrainConfig, n_examples: int) -> int:
    full = config.epochs * EpochOrder.steps_per_epoch(n_examples, config.batch_size, config.grad_accum)
    return full if config.max_steps is None else min(full, config.max_steps)


def _checkpointing_on(model) -> bool:
    # transformers 5 renamed the property (the old name warns); read whichever the class has
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    return bool(getattr(model, name, False))


def _set_gradient_checkpointing(reader, enabled: bool) -> None:
    model = reader.hf_model
    if enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif _checkpointing_on(model):
        model.gradient_checkpointing_disable()


def validation_loss(reader, examples: ExampleSet, batch_size: int) -> float:
    """Answer-token mean NLL over every example of ``examples`` (eval mode, no gradients)."""
    was_training = reader.model.training
    reader.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad(), stage("jomed.stage1.validation"):
            for idx in examples.batches(batch_size):
                nll, n = _loss.answer_nll(reader, examples.encode(reader, idx))
                total += float(nll)
                count += n
    finally:
        reader.train(was_training)
    return total / count


def _train_step(reader, examples: ExampleSet, micro_batches: list[list[int]], step: int,
                last_checkpoint: Path | None) -> float:
    """Forward/backward every micro-batch of one step (token mean over the step); returns the loss."""
    inputs = [examples.encode(reader, idx) for idx in micro_batches]
    tokens = sum(_loss.count_answer_tokens(x["labels"]) for x in inputs)
    total = 0.0
    for x in inputs:
        nll, _ = _loss.answer_nll(reader, x)
        loss = nll / tokens
        check_finite(loss, step, None if last_checkpoint is None else str(last_checkpoint))
        loss.backward()
        total += float(loss.detach())
    check_finite(total, step, None if last_checkpoint is None else str(last_checkpoint))
    return total


# --------------------------------------------------------------------------------------------- trainer
class _Run:
    """The mutable state of one run (what a checkpoint holds) and how to save / restore it."""

    def __init__(self, config, reader, run_dir: Path, n_train: int):
        self.config = config
        self.reader = reader
        self.run_dir = run_dir
        self.params = dict(sorted(reader.trainable_parameters().items()))
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.total_steps = _total_steps(config, n_train)
        self.scheduler = warmup_cosine(self.optimizer, self.total_steps, config.warmup_ratio)
        self.order = EpochOrder(n_train, config.seed)
        self.step = 0
        self.result = ReaderTrainResult(run_dir=run_dir, examples=n_train)

    def _extra(self) -> dict:
        r = self.result
        return {"train_loss": r.train_loss, "val_loss": r.val_loss, "best_val_loss": r.best_val_loss,
                "best_step": r.best_step}

    def _kwargs(self) -> dict:
        return {"params": self.params, "optimizer": self.optimizer, "scheduler": self.scheduler,
                    "generators": {"data": self.order.generator}, "data": self.order.state(), "extra": self._extra()}

    def save(self) -> Path:
        path = save_checkpoint(self.run_dir, self.step, keep=self.config.keep, **self._kwargs())
        self.result.last_checkpoint = path
        return path

    def save_best(self) -> Path:
        path = save_named(self.run_dir, "best", self.step, **self._kwargs())
        self.result.best_checkpoint = path
        return path

    def restore(self, path: Path) -> None:
        state = load_checkpoint(path, params=self.params, optimizer=self.optimizer, scheduler=self.scheduler,
                                generators={"data": self.order.generator})
        self.step = int(state["step"])
        self.order.restore(state["data"])
        extra = state["extra"]
        r = self.result
        r.train_loss = [tuple(x) for x in extra["train_loss"]]
        r.val_loss = [tuple(x) for x in extra["val_loss"]]
        r.best_val_loss, r.best_step = float(extra["best_val_loss"]), int(extra["best_step"])
        best = self.run_dir / "checkpoints" / "best"
        r.best_checkpoint = best if best.is_dir() else None
        r.last_checkpoint = path
        r.resumed_from = path


def _evaluate(run: _Run, val: ExampleSet, batch_size: int) -> float:
    loss = validation_loss(run.reader, val, batch_size)
    check_finite(loss, run.step, None if run.result.last_checkpoint is None else str(run.result.last_checkpoint))
    run.result.val_loss.append((run.step, loss))
    if loss < run.result.best_val_loss:
        run.result.best_val_loss, run.result.best_step = loss, run.step
        run.save_best()
    return loss


def _optimizer_step(run: _Run, train: ExampleSet, micro: list[list[int]]) -> float:
    """One optimizer step over ``micro`` (forward/backward, clip, AdamW, LR schedule); advances the data."""
    with stage("jomed.stage1.step"):
        loss = _train_step(run.reader, train, micro, run.step + 1, run.result.last_checkpoint)
        if run.config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(list(run.params.values()), run.config.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    run.order.advance(sum(len(m) for m in micro))
    run.step += 1
    run.result.train_loss.append((run.step, loss))
    return loss


def _after_step(run: _Run, val: ExampleSet, eval_bs: int) -> None:
    """Validation (keeping the best) every ``eval_every`` steps, a checkpoint every ``save_every``;
    both at the last step."""
    last = run.step == run.total_steps
    if run.step % run.config.eval_every == 0 or last:
        _evaluate(run, val, eval_bs)
        run.reader.train()
    if run.step % run.config.save_every == 0 or last:
        run.save()


def _progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="stage 1 (reader)", unit="step", dynamic_ncols=True)


def train_reader(
    config: ReaderTrainConfig,
    reader,
    task,
    train_samples: Sequence[Any],
    val_samples: Sequence[Any],
    run_dir,
    retrieval=None,
    retriever=None,
    resume: bool = True,
    progress: bool = True,
    on_step: Callable[[dict], None] | None = None,
) -> ReaderTrainResult:
    """Stage 1: fine-tune the reader's LoRA adapter on (sample, retrieved candidate) prompts.

    Args:
        config: the options (:class:`ReaderTrainConfig`).
        reader: a ``Reader`` with a trainable LoRA adapter (``load_reader(path, "nf4", lora=True)``).
        task: the task (legend, question, canonical answers).
        train_samples / val_samples: samples with ``load_image()``, ``label`` / ``answer``, ``question``.
        run_dir: where config, checkpoints, the adapter and the result go.
        retrieval / retriever: a :class:`jomed_fast.retrieval.Retrieval` and the frozen retriever
            whose ``encode_images`` gives the query embeddings; both ``None``: reader only.
        resume: continue from ``run_dir``'s latest checkpoint when there is one.
        progress: show a tqdm bar (loss, examples/s).
        on_step: called after every optimizer step with ``{"step", "loss", "lr", "epoch", "index"}``.

    Returns a :class:`ReaderTrainResult` (also written to ``run_dir/result.json``).
    """
    _check_args(config, reader, task, train_samples, val_samples, retrieval, retriever)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_run_config(run_dir, config, resume)
    _seed_everything(config.seed)
    train, val = _build_examples(config, task, train_samples, val_samples, retrieval, retriever)
    eval_bs = config.eval_batch_size or config.batch_size
    _set_gradient_checkpointing(reader, config.gradient_checkpointing)

    run = _Run(config, reader, run_dir, len(train))
    latest = latest_checkpoint(run_dir) if resume else None
    if latest is not None:
        run.restore(latest)
    else:
        _evaluate(run, val, eval_bs)  # step 0: the validation loss before training
    reader.train()
    reader.model.zero_grad(set_to_none=True)
    bar = _progress_bar(progress, run.total_steps, run.step)
    seen, busy = 0, 0.0  # examples trained by this process, and the seconds their steps took
    try:
        while run.step < run.total_steps:
            micro = run.order.next_step(config.batch_size, config.grad_accum)
            t0 = time.perf_counter()
            loss = _optimizer_step(run, train, micro)
            busy += time.perf_counter() - t0
            seen += sum(len(m) for m in micro)
            _after_step(run, val, eval_bs)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", val=f"{run.result.val_loss[-1][1]:.4f}",
                                ex_s=f"{seen / max(busy, 1e-9):.1f}")
            if on_step is not None:
                on_step({"step": run.step, "loss": loss, "lr": run.scheduler.get_last_lr()[0], **run.order.state()})
    finally:
        if bar is not None:
            bar.close()
        reader.model.zero_grad(set_to_none=True)
    reader.eval()
    run.result.steps = run.step
    run.result.examples_per_second = seen / busy if seen else 0.0
    run.result.adapter_dir = reader.save_adapter(run_dir / ADAPTER_DIR)
    atomic_write_json(run_dir / RESULT_FILE, run.result.to_dict())
    return run.result
