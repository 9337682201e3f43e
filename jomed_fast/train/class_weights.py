r"""Stage 1's class-weighted answer loss, for imbalanced tasks (a reader that learns the majority).

With class weights :math:`w \in \mathbb{R}^C_{>0}`, an optimizer step over examples :math:`i`
(class :math:`y_i`, supervised answer positions :math:`\mathcal{A}_i`: the answer tokens and the
end-of-turn token, as :mod:`.reader_loss`) minimises the weighted mean of each example's
class-restricted answer NLL

.. math::
    \ell_i = -\sum_{t \in \mathcal{A}_i} \log \operatorname{softmax}_{\mathcal{V}}(W_{\mathcal{V}} h_t)[y_t],
    \qquad
    \mathcal{L} = \frac{\sum_i w_{y_i}\, \ell_i}{\sum_i w_{y_i}}

with :math:`\mathcal{V}` the task's answer tokens (``verbalizer.allowed_token_ids``: every label's
tokens and the end token) and :math:`W_{\mathcal{V}} \in \mathbb{R}^{|\mathcal{V}| \times H}` their
rows of the LM head. The softmax is over :math:`\mathcal{V}` rather than the vocabulary because
that is what inference reads (``scoring.class_head``: ``log p_C``), so the weights act on the
decision itself; :math:`\ell_i` is the restricted teacher-forced log-likelihood of the gold class's
tokens, ``raw_y`` in ``class_head``'s sequence mode. Without weights stage 1 keeps the
full-vocabulary token mean of :mod:`.reader_loss`.

Weights (``ReaderTrainConfig.class_weights``): ``"inverse-frequency"`` gives
:math:`w_c = S / (C\, S_c)` over the S training samples (after ``class_balanced`` truncation, which
it would make all ones), scikit-learn's ``class_weight="balanced"``; or C positive numbers, one per
class in the task's order, as ``"1,2.7"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .reader_loss import answer_positions

__all__ = ["INVERSE_FREQUENCY", "class_weight_vector", "parse_class_weights", "restricted_answer_nll"]

INVERSE_FREQUENCY = "inverse-frequency"


def parse_class_weights(spec: str, name: str = "config.class_weights") -> str | tuple[float, ...]:
    """``"inverse-frequency"``, or the weights of ``"w0,w1,..."`` (finite, > 0); else ``ValueError``."""
    if not isinstance(spec, str):
        raise ValueError(f"{name}: expected {INVERSE_FREQUENCY!r} or comma-separated positive numbers, got {spec!r}")
    if spec.strip() == INVERSE_FREQUENCY:
        return INVERSE_FREQUENCY
    parts = [p.strip() for p in spec.split(",")]
    try:
        weights = tuple(float(p) for p in parts)
    except ValueError:
        weights = ()
    if len(weights) < 2 or not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(
            f"{name}: expected {INVERSE_FREQUENCY!r} or one positive number per class (at least 2, "
            f"comma-separated), got {spec!r}"
        )
    return weights


def class_weight_vector(spec: str, labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """The ``[C]`` float64 weights of ``spec`` (see the module docstring) for training labels ``labels``."""
    parsed = parse_class_weights(spec)
    if parsed != INVERSE_FREQUENCY:
        if len(parsed) != num_classes:
            raise ValueError(
                f"config.class_weights: expected {num_classes} weights (one per class), got {len(parsed)} ({spec!r})"
            )
        return torch.tensor(parsed, dtype=torch.float64)
    counts = torch.bincount(torch.tensor(list(labels), dtype=torch.long), minlength=num_classes).double()
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(
            f"config.class_weights: {INVERSE_FREQUENCY} needs every class in the training samples; "
            f"class(es) {missing} have none"
        )
    return counts.sum() / (num_classes * counts)


def restricted_answer_nll(reader, inputs: dict[str, torch.Tensor], allowed: torch.Tensor) -> torch.Tensor:
    """``[B]`` float32: each row's :math:`\\ell_i`, the NLL of its supervised tokens under the softmax
    restricted to the ``allowed`` token ids ``[|V|]`` (differentiable w.r.t. the reader's trainables).

    Raises ``ValueError`` when a supervised token is not an allowed one (an answer that is not one
    of the task's labels)."""
    if "labels" not in inputs:
        raise ValueError("inputs: expected 'labels' (encode the batch with answers=...)")
    labels = inputs["labels"]
    rows, cols, targets = answer_positions(labels)
    if targets.numel() == 0:
        raise ValueError("inputs: the labels hold no answer token (every label is -100)")
    weight = reader.lm_head_weight()  # [V, H]
    allowed = allowed.to(weight.device)
    where = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
    where[allowed] = torch.arange(allowed.numel(), device=weight.device)
    index = where[targets.to(weight.device)]
    if bool((index < 0).any()):
        bad = int(targets[(index < 0).cpu()][0])
        raise ValueError(
            f"inputs: supervised token {bad} is not one of the task's answer tokens {allowed.tolist()}; "
            "the class-weighted loss needs answers that are the task's labels"
        )
    hidden = reader.hidden_states(inputs)  # [B, L, H]
    picked = hidden[rows.to(hidden.device), cols.to(hidden.device)]  # [T, H]
    bias = getattr(reader.lm_head, "bias", None)
    logits = F.linear(picked.to(weight.dtype), weight[allowed], None if bias is None else bias[allowed]).float()
    nll = -torch.log_softmax(logits, dim=-1).gather(1, index[:, None]).squeeze(1)  # [T]
    return torch.zeros(labels.shape[0], device=nll.device).index_add(0, rows.to(nll.device), nll)
