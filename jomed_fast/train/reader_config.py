"""``ReaderTrainConfig``: every option of stage 1 (reader fine-tuning), JSON-serialisable and checked.

Defaults are the reference's (LLaMA-Factory QLoRA SFT in github.com/Nirmaz/JOMED): AdamW at
``lr = 1e-4``, cosine schedule with 10 % linear warm-up, weight decay 0, gradient clipping at norm
1, gradient checkpointing on, the ``paper`` prompt layout, and ``k_text = k_image = 2`` retrieved
candidates per training sample (each its own example). Sizes are in *examples*: one example is one
(sample, candidate) prompt, so an optimizer step sees ``batch_size * grad_accum`` examples.

Every check raises ``ValueError`` naming the option, what was expected and what came
(``config.lr: expected a finite float > 0.0, got 0``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..prompts import LAYOUTS
from ..scoring.label_set_head import DEFAULT_MAX_LABELS
from ._config import JsonConfig
from .class_weights import parse_class_weights
from .run_log import REPORT_TO

__all__ = ["RESUME_FREE", "SELECT_BY", "ReaderTrainConfig"]

# what picks checkpoints/best: the lowest validation loss, or the highest macro-F1 / accuracy of
# the validation samples' class predictions
SELECT_BY = ("val_loss", "macro_f1", "accuracy")

# options that cannot change the trained weights or the curves (a resume is exact whatever they are):
# they may differ between a run and its resume
RESUME_FREE = ("save_every", "keep", "log_every", "report_to")


@dataclass(frozen=True)
class ReaderTrainConfig(JsonConfig):
    """Stage-1 options (see the module docstring for the defaults' source).

    Attributes:
        lr: peak learning rate of AdamW.
        epochs: passes over the training examples.
        batch_size: examples per micro-batch (one forward/backward).
        grad_accum: micro-batches per optimizer step.
        warmup_ratio: fraction of the steps with a linear warm-up (then cosine decay to 0).
        weight_decay: AdamW's decoupled weight decay.
        max_grad_norm: gradient clipping (total L2 norm); ``None`` or 0 disables it.
        max_steps: stop after this many optimizer steps (``None``: ``epochs`` full passes); the
            schedule spans the steps actually run.
        eval_every: validation every this many steps (and at the last step); the best is kept.
        save_every: a resumable checkpoint every this many steps (and at the last step).
        keep: how many step checkpoints to keep (the ``best`` one is kept apart).
        eval_batch_size: examples per validation forward (``None``: ``batch_size``).
        class_balanced: truncate every class of the training samples to the minority class's
            count (a seeded random subset per class, as the reference).
        class_weights: ``None`` (the full-vocabulary token mean), ``"inverse-frequency"`` or one
            positive weight per class (``"1,2.7"``): the class-weighted, class-restricted answer
            loss of :mod:`.class_weights`.
        select_by: what keeps ``checkpoints/best``: ``"val_loss"`` (lowest), ``"macro_f1"`` or
            ``"accuracy"`` (highest) of the validation samples' predictions (their K candidates'
            class-restricted probabilities averaged, the argmax).
        gradient_checkpointing: recompute decoder activations in backward (non-reentrant).
        seed: seeds the model's RNGs, the class-balanced subset and the data order.
        layout: the prompt layout (``jomed_fast.prompts.LAYOUTS``).
        max_labels: multi-label tasks: the largest answer set the validation scorer reads
            (``scoring.label_set_head``; the number of labels scores every set).
        k_text / k_image: candidates retrieved per sample by each head (with retrieval).
        log_every: a ``train`` line in ``run_dir/log.jsonl`` every this many steps (and at the last).
        report_to: ``"tensorboard"`` also writes the log's scalars to ``run_dir/tensorboard/``.
    """

    lr: float = 1e-4
    epochs: int = 1
    batch_size: int = 4
    grad_accum: int = 1
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    max_steps: int | None = None
    eval_every: int = 50
    save_every: int = 50
    keep: int = 2
    eval_batch_size: int | None = None
    class_balanced: bool = False
    class_weights: str | None = None
    select_by: str = field(default="val_loss", metadata={"choices": SELECT_BY})
    gradient_checkpointing: bool = True
    seed: int = 0
    layout: str = "paper"
    max_labels: int = DEFAULT_MAX_LABELS
    k_text: int = 2
    k_image: int = 2
    log_every: int = 1
    report_to: str = field(default="none", metadata={"choices": REPORT_TO})

    def __post_init__(self) -> None:
        self._check_float("lr", 0.0, lo_open=True)
        for name in ("epochs", "batch_size", "grad_accum", "eval_every", "save_every", "keep", "log_every"):
            self._check_int(name, 1)
        self._check_choice("report_to", REPORT_TO)
        self._check_float("warmup_ratio", 0.0, 1.0, hi_open=True)
        self._check_float("weight_decay", 0.0)
        self._check_float("max_grad_norm", 0.0, optional=True)
        self._check_int("max_steps", 1, optional=True)
        self._check_int("eval_batch_size", 1, optional=True)
        self._check_bool("class_balanced", "gradient_checkpointing")
        if self.class_weights is not None:
            parse_class_weights(self.class_weights)
        self._check_choice("select_by", SELECT_BY)
        self._check_int("seed", 0)
        self._check_choice("layout", LAYOUTS)
        self._check_int("max_labels", 1)
        self._check_int("k_text", 0)
        self._check_int("k_image", 0)
        if self.k_text + self.k_image < 1:
            self._fail("k_text + k_image", "at least 1 candidate per sample", self.k_text + self.k_image)

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @property
    def examples_per_step(self) -> int:
        return self.batch_size * self.grad_accum
