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

    DataOrder ─► grad_accum micro-batches of B example ids
    ExampleSet.encode ─► input_ids [B, L], labels [B, L] (+ pixel inputs)
    reader.hidden_states ─► [B, L, H] ─► the [T_b, H] answer positions ─► LM head ─► NLL sum
    loss_b = NLL_b / T (T over the whole step) ─► backward (grads accumulate)
    check_finite ─► clip ─► AdamW ─► warm-up + cosine LR

With ``class_weights`` the step's loss is instead the class-weighted mean of each example's
class-restricted answer NLL (:mod:`.class_weights`), for imbalanced tasks.

Every ``eval_every`` steps (and at the last) the validation loss (answer-token mean over every
validation example) is measured and the lowest is kept (``checkpoints/best``) — or, with
``select_by="macro_f1"`` / ``"accuracy"``, the highest macro-F1 / accuracy of the validation
samples' predictions (the class-restricted probabilities of a sample's K examples averaged, the
argmax; ``CandidateScorer``, the reader in eval mode); every
``save_every`` steps and at the end a resumable checkpoint is written — the loop, data order,
checkpoints and resume are :mod:`.loop`'s, shared with stage 2. A NaN/inf loss raises
:class:`~.guards.NonFiniteLossError` before anything is applied; the last checkpoint stays.

Files in ``run_dir``: ``identity.json`` (what decides the result: the reader with the adapter it
starts from, the train and validation samples, the index and encoder or their absence, the task
and every option but ``RESUME_FREE``; a resume with any of them changed is refused naming them),
``config.json`` (the options and the adapter's ``lora`` settings), ``checkpoints/`` (``step-*``,
``best``, ``LATEST``), ``log.jsonl`` (a line per step and per validation, :mod:`.run_log`;
``tensorboard/`` with ``report_to="tensorboard"``),
``adapter/`` (the final LoRA adapter, ``load_reader(path, lora=run_dir / "adapter")``; its
``jomed_adapter.json`` records ``config.layout``, which stage 2 and inference then hold to),
``result.json``. SIGTERM stops the run after the step under way, checkpointed
(:class:`~.preemption.StoppedBySignal`); a rerun resumes.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._checks import is_int
from .._profiling import stage
from ..data.records import records_digest
from ..eval.metrics import accuracy, macro_f1
from ..readers.fingerprint import reader_fingerprint
from . import reader_loss as _loss
from .checkpoint import CHECKPOINT_DIR
from .class_weights import class_weight_vector, restricted_answer_nll
from .guards import check_finite
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
from .reader_config import RESUME_FREE, ReaderTrainConfig
from .reader_data import ExampleSet, balanced_indices, retrieve_candidates

__all__ = ["ReaderTrainConfig", "ReaderTrainResult", "train_reader", "validation_loss"]

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
        select_by / best_value: what selected ``checkpoints/best`` and its value there.
        val_metrics: ``[(step, {"val_loss", "accuracy", "macro_f1", "predictions"})]`` per validation
            (accuracy, macro-F1 and the per-sample predictions with ``select_by`` other than
            ``val_loss``).
        class_weights: the ``[C]`` weights of the answer loss (``None``: unweighted).
        excluded_self: ``{"train", "val"}`` index rows left out of the samples' retrieval as the
            samples themselves (same id or image sha256, or near duplicates), summed over the split;
            ``None`` without retrieval.
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
    select_by: str = "val_loss"
    best_value: float | None = None
    val_metrics: list = field(default_factory=list)
    class_weights: list | None = None
    excluded_self: dict | None = None

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
        raise ValueError(
            "retrieval, retriever: expected both (retrieval-augmented) or neither (reader only), "
            f"got retrieval={type(retrieval).__name__}, retriever={type(retriever).__name__}"
        )
    if config.class_weights is not None or config.select_by != "val_loss":
        _check_class_labels(config, task, train_samples, "train_samples")
        _check_class_labels(config, task, val_samples, "val_samples")


def _check_class_labels(config, task, samples, name: str) -> None:
    """Class weights and class-metric selection need single-label samples with a class index."""
    option = "config.class_weights" if config.class_weights is not None else "config.select_by"
    if not task.has_label_set or task.is_multilabel:
        raise ValueError(f"{option}: needs a single-label task with a label set, got {task.name!r} ({task.kind})")
    for i, s in enumerate(samples):
        label = getattr(s, "label", None)
        if not is_int(label) or not 0 <= label < task.num_classes:
            raise ValueError(
                f"{name}[{i}]: {option} needs a class index in 0..{task.num_classes - 1} as label, got {label!r}"
            )


def _identity(config, reader, task, train_samples, val_samples, retrieval, retriever) -> dict:
    """What decides a stage-1 result (``identity.json``): the reader as it starts (base weights,
    quantization, CPU kernel, the adapter's initial weights), the task, the samples' content, the
    index and encoder (``None`` for reader only) and every option but ``RESUME_FREE``."""
    return {
        "reader": reader_fingerprint(reader),
        "task": task.identity,
        "train": records_digest(train_samples),
        "val": records_digest(val_samples),
        **retrieval_identity(retrieval, retriever),
        **options_identity(config, RESUME_FREE),
    }


# --------------------------------------------------------------------------------------------- pieces
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _build_examples(
    config, task, train_samples, val_samples, retrieval, retriever
) -> tuple[ExampleSet, ExampleSet, dict | None]:
    """The train and validation examples, and the index rows their retrieval left out as the samples
    themselves (``None`` without retrieval)."""
    train = list(train_samples)
    if config.class_balanced:
        train = [train[i] for i in balanced_indices(train, config.seed)]
    if retrieval is None:
        return ExampleSet(train, task, config.layout), ExampleSet(list(val_samples), task, config.layout), None
    train_c, _, train_x = retrieve_candidates(train, retrieval, retriever, config.k_text, config.k_image)
    val_c, _, val_x = retrieve_candidates(list(val_samples), retrieval, retriever, config.k_text, config.k_image)
    excluded = {"train": int(train_x.sum()), "val": int(val_x.sum())}
    return (
        ExampleSet(train, task, config.layout, train_c),
        ExampleSet(list(val_samples), task, config.layout, val_c),
        excluded,
    )


def _checkpointing_on(model) -> bool:
    # transformers 5 renamed the property (the old name warns); read whichever the class has
    name = (
        "is_activation_checkpointing"
        if hasattr(type(model), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    return bool(getattr(model, name, False))


def _set_gradient_checkpointing(reader, enabled: bool) -> None:
    model = reader.hf_model
    if enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif _checkpointing_on(model):
        model.gradient_checkpointing_disable()


def validation_predictions(scorer, examples: ExampleSet, batch_size: int) -> list[int]:
    """Each sample's class: the argmax of its K examples' class-restricted probabilities averaged
    (one example each without retrieval); the reader in eval mode, no gradients."""
    reader = scorer.reader
    was_training = reader.model.training
    reader.eval()
    out: list[int] = []
    try:
        with torch.no_grad(), stage("jomed.stage1.validation"):
            for lo in range(0, len(examples.samples), batch_size):
                part = examples.samples[lo : lo + batch_size]
                cands = (
                    [[None]] * len(part) if examples.candidates is None else examples.candidates[lo : lo + len(part)]
                )
                log_p = scorer.score(
                    [s.load_image() for s in part], [getattr(s, "question", None) for s in part], cands
                )  # [B, K, C]
                out.extend(log_p.float().exp().mean(1).argmax(-1).tolist())
    finally:
        reader.train(was_training)
    return out


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


# --------------------------------------------------------------------------------------------- stage
class _ReaderStage:
    """Stage 1 for :func:`.loop.run_loop`: the LoRA weights, the answer NLL of a step, validation."""

    desc = "stage 1 (reader)"

    def __init__(
        self, config: ReaderTrainConfig, reader, task, train: ExampleSet, val: ExampleSet, weights: torch.Tensor | None
    ):
        self.config, self.reader, self.examples, self.val = config, reader, train, val
        self.weights = weights  # [C] float64, or None: the unweighted token mean
        self.scorer = None
        if weights is not None or config.select_by != "val_loss":
            from ..scoring import CandidateScorer

            self.scorer = CandidateScorer(reader, task, config.layout, max_labels=config.max_labels)
        self.allowed = (
            torch.tensor(self.scorer.verbalizer.allowed_token_ids, dtype=torch.long)
            if weights is not None and self.scorer is not None
            else None
        )
        self.params = dict(sorted(reader.trainable_parameters().items()))
        self.trainable = list(self.params.values())
        self.eval_bs = config.eval_batch_size or config.batch_size
        self.seen, self.busy = 0, 0.0  # examples trained by this process, and the seconds their steps took
        self._step_examples = 0

    def start(self, state: RunState, resumed: bool) -> Offer | None:
        offer = None
        if not resumed:
            state.log = {"train_loss": [], "val_loss": [], "val_metrics": []}
            offer = self._evaluate(state)  # step 0: the validation loss before training
        self.reader.train()
        self.reader.model.zero_grad(set_to_none=True)
        return offer

    def step_loss(self, batches: list[list[int]], state: RunState) -> float:
        """Forward/backward every micro-batch (token mean over the whole step: T counts all of them)."""
        with stage("jomed.stage1.step"):
            inputs = [self.examples.encode(self.reader, idx) for idx in batches]
            total = 0.0
            if self.weights is not None:
                assert self.allowed is not None  # set with the weights
                w = [self.weights[[self.examples.label(j) for j in idx]] for idx in batches]
                mass = float(sum(float(x.sum()) for x in w))  # the weights of the whole step's examples
                for x, wb in zip(inputs, w):
                    nll = restricted_answer_nll(self.reader, x, self.allowed)  # [B]
                    loss = (wb.to(nll) * nll).sum() / mass
                    loss.backward()
                    total += float(loss.detach())
            else:
                tokens = sum(_loss.count_answer_tokens(x["labels"]) for x in inputs)
                for x in inputs:
                    nll, _ = _loss.answer_nll(self.reader, x)
                    loss = nll / tokens
                    loss.backward()
                    total += float(loss.detach())
        self._step_examples = sum(len(b) for b in batches)
        return total

    def after_step(self, state: RunState, loss: float, seconds: float, epoch_ended: bool, last: bool) -> Offer | None:
        self.seen += self._step_examples
        self.busy += seconds
        state.log["train_loss"].append((state.step, loss))
        if state.step % self.config.eval_every == 0 or last:
            return self._evaluate(state)
        return None

    def _evaluate(self, state: RunState) -> Offer:
        loss = validation_loss(self.reader, self.val, self.eval_bs)
        check_finite(loss, state.step, None if state.last_checkpoint is None else str(state.last_checkpoint))
        state.log["val_loss"].append((state.step, loss))
        metrics: dict = {"val_loss": loss}
        entry = metrics
        if self.config.select_by != "val_loss":
            assert self.scorer is not None  # built for class-metric selection
            predictions = validation_predictions(self.scorer, self.val, self.eval_bs)
            golds = [int(s.label) for s in self.val.samples]
            metrics["accuracy"] = accuracy(predictions, golds)
            metrics["macro_f1"] = macro_f1(predictions, golds, self.scorer.num_classes)
            entry = {**metrics, "predictions": predictions}
        state.log.setdefault("val_metrics", []).append((state.step, entry))
        value = metrics[self.config.select_by]
        return Offer(value, {"step": state.step, **metrics}, metrics)

    def postfix(self, state: RunState, loss: float) -> dict:
        return {
            "loss": f"{loss:.4f}",
            "val": f"{state.log['val_loss'][-1][1]:.4f}",
            "ex_s": f"{self.seen / max(self.busy, 1e-9):.1f}",
        }


def _loop_options(config: ReaderTrainConfig, n: int) -> LoopOptions:
    return LoopOptions(
        n=n,
        batch_size=config.batch_size,
        grad_accum=config.grad_accum,
        epochs=config.epochs,
        max_steps=config.max_steps,
        lr=config.lr,
        weight_decay=config.weight_decay,
        seed=config.seed,
        warmup_ratio=config.warmup_ratio,
        max_grad_norm=config.max_grad_norm,
        checkpoint_every=config.save_every,
        keep=config.keep,
        select="min" if config.select_by == "val_loss" else "max",
        log_every=config.log_every,
        report_to=config.report_to,
    )


def _result(
    state: RunState, stage1: _ReaderStage, run_dir: Path, adapter_dir: Path, excluded: dict | None
) -> ReaderTrainResult:
    best = state.best
    return ReaderTrainResult(
        train_loss=[tuple(x) for x in state.log["train_loss"]],
        val_loss=[tuple(x) for x in state.log["val_loss"]],
        best_val_loss=best["record"]["val_loss"] if best else math.inf,
        best_step=best["step"] if best else -1,
        select_by=stage1.config.select_by,
        best_value=best["value"] if best else None,
        val_metrics=[tuple(x) for x in state.log.get("val_metrics", [])],
        class_weights=None if stage1.weights is None else stage1.weights.tolist(),
        steps=state.step,
        examples=len(stage1.examples),
        run_dir=run_dir,
        adapter_dir=adapter_dir,
        best_checkpoint=run_dir / CHECKPOINT_DIR / BEST if best else None,
        last_checkpoint=state.last_checkpoint,
        resumed_from=state.resumed_from,
        examples_per_second=stage1.seen / stage1.busy if stage1.seen else 0.0,
        excluded_self=excluded,
    )


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
        reader: a ``Reader`` with a trainable LoRA adapter (``load_reader(path, "nf4", lora=True)``);
            trained in place. On resume pass the reader as the run started it (the same base and the
            same initial adapter: a fresh adapter drawn with the same seed, or the same ``--adapter``):
            the checkpoint restores the trained weights.
        task: the task (legend, question, canonical answers).
        train_samples / val_samples: samples with ``load_image()``, ``label`` / ``answer``, ``question``.
        run_dir: where identity, config, checkpoints, the adapter and the result go.
        retrieval / retriever: a :class:`jomed_fast.candidate_retrieval.Retrieval` and the frozen retriever
            whose ``encode_images`` gives the query embeddings; both ``None``: reader only.
        resume: continue from ``run_dir``'s latest checkpoint when there is one (refused, naming
            them, when the inputs differ from the run's: ``IdentityMismatch``).
        progress: show a tqdm bar (loss, examples/s).
        on_step: called after every optimizer step with ``{"step", "loss", "lr", "epoch", "position"}``.

    Returns a :class:`ReaderTrainResult` (also written to ``run_dir/result.json``).
    """
    _check_args(config, reader, task, train_samples, val_samples, retrieval, retriever)
    run_dir = Path(run_dir)
    identity = _identity(config, reader, task, train_samples, val_samples, retrieval, retriever)
    # config.json also shows the adapter's settings (rank, vision tower adapted or not): the
    # identity holds them through the reader's fingerprint, which people cannot read
    lora = dataclasses.asdict(reader.lora) if reader.lora is not None else None
    ckpt = open_run(run_dir, identity, {**config.to_dict(), "lora": lora}, resume)
    _seed_everything(config.seed)
    train, val, excluded = _build_examples(config, task, train_samples, val_samples, retrieval, retriever)
    weights = None
    if config.class_weights is not None:
        weights = class_weight_vector(config.class_weights, [int(s.label) for s in train.samples], task.num_classes)
    _set_gradient_checkpointing(reader, config.gradient_checkpointing)
    stage1 = _ReaderStage(config, reader, task, train, val, weights)
    try:
        state = run_loop(stage1, _loop_options(config, len(train)), run_dir, ckpt, progress=progress, on_step=on_step)
    finally:
        reader.model.zero_grad(set_to_none=True)
    reader.eval()
    adapter_dir = reader.save_adapter(run_dir / ADAPTER_DIR, layout=config.layout)
    # the reader in memory now carries what its saved adapter records: stage 2 and inference in
    # this process are held to the layout it was trained on, as a reader loaded from the adapter is
    reader.trained_layout = config.layout
    reader.trained_layout_from = str(adapter_dir / "jomed_adapter.json")
    result = _result(state, stage1, run_dir, adapter_dir, excluded)
    write_result(run_dir, result.to_dict())
    return result
