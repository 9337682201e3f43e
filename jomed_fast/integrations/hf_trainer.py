r"""The class-restricted answer NLL for Hugging Face ``Trainer`` and TRL users, with no ``[B, L, V]`` logits.

.. math::

    \mathcal{L} = -\frac{1}{B} \sum_b \log p(y_b \mid x_b), \qquad
    \log p(\cdot \mid x_b) = \texttt{model(**batch, class\_token\_ids=ids)}_b \quad [B, C]

:func:`class_nll_loss` takes the ``[B, C]`` log-probabilities of a model patched by
:func:`jomed_fast.integrations.patch_class_head` and the gold answers ``[B]``: class indices in
``[0, C)``, or gold answer token ids (each one of ``class_token_ids``), mapped to their classes.

:class:`ClassHeadTrainerMixin` puts it in a trainer::

    class ClassHeadTrainer(ClassHeadTrainerMixin, transformers.Trainer): ...   # or a TRL trainer
    trainer = ClassHeadTrainer(model=model, args=args, train_dataset=ds, class_token_ids=ids)

Each batch holds the model's inputs (``input_ids``, ``attention_mask``, ``pixel_values`` ...),
optionally ``answer_positions`` ``[B]``, and ``labels`` ``[B]`` (class indices, or token ids with
``labels_are_token_ids=True``); a TRL collator's ``[B, L]`` labels are not this. The loss is each
batch's mean, which the Trainer divides by the gradient accumulation steps; evaluation predicts
the ``[B, C]`` log-probabilities (``class_log_probs``).
"""

from __future__ import annotations

from typing import Any

import torch

from .hf import (
    as_class_token_ids,
    as_integer_tensor,
    find_class_head_patch,
    lm_head_parameters,
    patch_class_head,
    transformers_model,
)

__all__ = ["ClassHeadTrainerMixin", "class_nll_loss"]


def class_nll_loss(
    class_log_probs: torch.Tensor, labels: Any, class_token_ids: Any = None, reduction: str = "mean"
) -> torch.Tensor:
    """``-log p(labels_b | x_b)`` from the class log-probabilities ``[B, C]``: float32, its mean
    (``reduction="mean"``), sum (``"sum"``) or ``[B]`` (``"none"``).

    ``labels`` ``[B]``: class indices in ``[0, C)``; with ``class_token_ids`` (``[C]``, as the model
    was called with) the gold answer token ids instead, each one of the class ids.
    """
    if not isinstance(class_log_probs, torch.Tensor) or class_log_probs.dim() != 2:
        shape = tuple(class_log_probs.shape) if isinstance(class_log_probs, torch.Tensor) else type(class_log_probs)
        raise ValueError(f"class_log_probs: expected a [B, C] tensor, got {shape}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
    batch, num_classes = class_log_probs.shape
    targets = as_integer_tensor("labels", labels).to(class_log_probs.device, torch.int64)
    if targets.dim() != 1 or targets.shape[0] != batch:
        raise ValueError(
            f"labels: expected shape [B] = ({batch},) (the rows of class_log_probs), got {tuple(targets.shape)}"
        )
    if class_token_ids is not None:
        ids = as_class_token_ids(class_token_ids, None, class_log_probs.device)
        if ids.numel() != num_classes:
            raise ValueError(
                f"class_token_ids: expected C = {num_classes} ids (the columns of class_log_probs), got {ids.numel()}"
            )
        match = targets[:, None] == ids[None, :]  # [B, C]
        unmatched = ~match.any(dim=1)
        if bool(unmatched.any()):
            row = int(unmatched.nonzero()[0])
            raise ValueError(
                f"labels: expected gold token ids among class_token_ids {ids.tolist()[:32]}, got {int(targets[row])} in row {row}"
            )
        targets = match.to(torch.int8).argmax(dim=1)
    elif batch > 0 and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise ValueError(
            f"labels: expected class indices in [0, {num_classes}) (C={num_classes}), "
            f"got min {int(targets.min())} and max {int(targets.max())}"
        )
    return torch.nn.functional.nll_loss(class_log_probs.float(), targets, reduction=reduction)


class ClassHeadTrainerMixin:
    """A ``transformers.Trainer`` (or TRL trainer) whose loss is :func:`class_nll_loss` (module docstring).

    Put it first in the bases. Its ``__init__`` takes ``class_token_ids`` (converted once, per device
    after that) and ``labels_are_token_ids``, then the trainer's own arguments, and patches the
    model with the class head unless it already carries it (``class_head_patch``).
    """

    model: Any  # set by the trainer's __init__
    # compute_loss returns each batch's mean; the Trainer scales it for gradient accumulation
    loss_is_scaled_for_ga = False

    def __init__(self, *args, class_token_ids: Any, labels_are_token_ids: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(labels_are_token_ids, bool):
            raise TypeError(f"labels_are_token_ids: expected a bool, got {type(labels_are_token_ids).__name__}")
        self.class_head_patch = find_class_head_patch(self.model) or patch_class_head(self.model)
        vocab_size = lm_head_parameters(transformers_model(self.model))[0].shape[0]
        self.class_token_ids = as_class_token_ids(class_token_ids, vocab_size, "cpu")
        self.labels_are_token_ids = labels_are_token_ids
        self._class_ids_by_device: dict[torch.device, torch.Tensor] = {}

    def _class_ids_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._class_ids_by_device:
            self._class_ids_by_device[device] = self.class_token_ids.to(device)
        return self._class_ids_by_device[device]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ValueError(f"inputs: expected 'labels' [B] (the gold answers), got a batch of {sorted(inputs)}")
        weight, _ = lm_head_parameters(transformers_model(self.model))
        ids = self._class_ids_on(weight.device)
        log_probs = model(**inputs, class_token_ids=ids)
        loss = class_nll_loss(log_probs, labels, ids if self.labels_are_token_ids else None)
        return (loss, {"class_log_probs": log_probs}) if return_outputs else loss
