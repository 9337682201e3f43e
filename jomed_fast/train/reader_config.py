"""``ReaderTrainConfig``: every option of stage 1 (reader fine-tuning), JSON-serialisable and checked.

Defaults are the reference's (LLaMA-Factory QLoRA SFT in github.com/Nirmaz/JOMED): AdamW at
``lr = 1e-4``, cosine schedule with 10 % linear warm-up, weight decay 0, gradient clipping at norm
1, gradient checkpointing on, the ``paper`` prompt layout, and ``k_text = k_image = 2`` retrieved
candidates per training sample (each its own example). Sizes are in *examples*: one example is one
(sample, candidate) prompt, so an optimizer step sees ``batch_size * grad_accum`` examples.

Every check raises ``ValueError`` naming the option, what was expected and what came.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from ..prompts import LAYOUTS
from ._config import JsonConfig

__all__ = ["ReaderTrainConfig"]


def _need(cond: bool, name: str, expected: str, got: Any) -> None:
    if not cond:
        raise ValueError(f"ReaderTrainConfig.{name}: expected {expected}, got {got!r}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


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
        gradient_checkpointing: recompute decoder activations in backward (non-reentrant).
        seed: seeds the model's RNGs, the class-balanced subset and the data order.
        layout: the prompt layout (``jomed_fast.prompts.LAYOUTS``).
        k_text / k_image: candidates retrieved per sample by each head (with retrieval).
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
    gradient_checkpointing: bool = True
    seed: int = 0
    layout: str = "paper"
    k_text: int = 2
    k_image: int = 2

    def __post_init__(self) -> None:
        _need(_is_num(self.lr) and self.lr > 0, "lr", "a positive finite number", self.lr)
        for name in ("epochs", "batch_size", "grad_accum", "eval_every", "save_every", "keep"):
            value = getattr(self, name)
            _need(_is_int(value) and value >= 1, name, "an int >= 1", value)
        _need(_is_num(self.warmup_ratio) and 0.0 <= self.warmup_ratio < 1.0, "warmup_ratio",
              "a number in [0, 1)", self.warmup_ratio)
        _need(_is_num(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a number >= 0",
              self.weight_decay)
        _need(self.max_grad_norm is None or (_is_num(self.max_grad_norm) and self.max_grad_norm >= 0),
              "max_grad_norm", "None or a number >= 0", self.max_grad_norm)
        _need(self.max_steps is None or (_is_int(self.max_steps) and self.max_steps >= 1), "max_steps",
              "None or an int >= 1", self.max_steps)
        _need(self.eval_batch_size is None or (_is_int(self.eval_batch_size) and self.eval_batch_size >= 1),
              "eval_batch_size", "None or an int >= 1", self.eval_batch_size)
        for name in ("class_balanced", "gradient_checkpointing"):
            _need(isinstance(getattr(self, name), bool), name, "a bool", getattr(self, name))
        _need(_is_int(self.seed) and self.seed >= 0, "seed", "an int >= 0", self.seed)
        _need(self.layout in LAYOUTS, "layout", f"one of {LAYOUTS}", self.layout)
        for name in ("k_text", "k_image"):
            _need(_is_int(getattr(self, name)) and getattr(self, name) >= 0, name, "an int >= 0", getattr(self, name))
        _need(self.k_text + self.k_image >= 1, "k_text + k_image", "at least 1 candidate per sample",
              self.k_text + self.k_image)

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @property
    def examples_per_step(self) -> int:
        return self.batch_size * self.grad_accum
