r"""Stage 1's loss: the NLL of the answer tokens only, with the LM head applied at those positions only.

A batch holds B prompts of padded length L, each followed by its answer and the end-of-turn token
(``ReaderProcessor.encode_batch(..., answers=...)``); ``labels [B, L]`` is ``-100`` everywhere
except on the answer tokens and the end-of-turn token. Position ``t`` of row ``b`` predicts token
``t + 1``, so with :math:`\mathcal{A} = \{(b, t) : \text{labels}_{b, t+1} \ne -100\}` (T pairs) the
loss is the full-vocabulary cross-entropy

.. math::
    \mathcal{L} = \frac{1}{T} \sum_{(b, t) \in \mathcal{A}}
        -\log \operatorname{softmax}(W h_{b,t})_{y_{b,t+1}}
    \qquad h_{b,t} \in \mathbb{R}^H,\; W \in \mathbb{R}^{V \times H}

which is exactly what the unmodified Hugging Face model returns for ``labels=`` (transformers'
``ForCausalLMLoss``: shift, ``-100`` ignored, mean over the kept tokens; the reference trains with
LLaMA-Factory, whose SFT loss is that one). Only the ``[T, H]`` hidden states of :math:`\mathcal{A}`
meet the ``[V, H]`` head: ``[T, V]`` logits instead of ``[B, L, V]``.

Which tokens are supervised (decided from the chat templates, as LLaMA-Factory's templates for
these families): the answer text tokenized on its own after the generation prompt, then the
template's end-of-turn token, ``<|im_end|>`` (Qwen2-VL: ``...<|im_start|>assistant\n{answer}<|im_end|>``)
or ``</s>`` (Pixtral: ``...[/INST]{answer}</s>``). Supervising the end-of-turn token teaches the
reader to stop after the label. The template's trailing ``"\n"`` after ``<|im_end|>`` is not
supervised (generation stops at ``<|im_end|>``).

For gradient accumulation, :func:`answer_nll` returns the *sum* and the count, so a step's loss is
``sum over its micro-batches / tokens of the whole step`` (the token mean over the step, as
transformers' Trainer with ``num_items_in_batch``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..readers.processor import IGNORE_INDEX

__all__ = ["answer_nll", "answer_positions", "count_answer_tokens"]


def answer_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows [T], cols [T], targets [T])``: the positions whose next token is supervised, and that token."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2 or labels.dtype != torch.long:
        got = f"{tuple(labels.shape)} {labels.dtype}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels: expected a long tensor [B, L], got {got}")
    nxt = labels[:, 1:]
    rows, cols = (nxt != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows, cols, nxt[rows, cols]


def count_answer_tokens(labels: torch.Tensor) -> int:
    """T: the number of supervised tokens of a batch (the first position is never predicted)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def answer_nll(reader, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """``(sum of the answer tokens' NLL, T)`` for a batch from ``encode_batch(..., answers=...)``.

    Runs the decoder once (``reader.hidden_states``: no logits), gathers the ``[T, H]`` states that
    predict the answer tokens and applies the LM head to them only; the cross-entropy is taken in
    float32 over the whole vocabulary. The sum is a 0-dim float32 tensor (differentiable w.r.t.
    whatever requires grad in the reader).
    """
    if "labels" not in inputs:
        raise ValueError("inputs: expected 'labels' (encode the batch with answers=...)")
    rows, cols, targets = answer_positions(inputs["labels"])
    if targets.numel() == 0:
        raise ValueError("inputs: the labels hold no answer token (every label is -100)")
    hidden = reader.hidden_states(inputs)  # [B, L, H]
    picked = hidden[rows.to(hidden.device), cols.to(hidden.device)]  # [T, H]
    weight = reader.lm_head_weight()  # [V, H]
    bias = getattr(reader.lm_head, "bias", None)
    logits = F.linear(picked.to(weight.dtype), weight, bias).float()  # [T, V]
    nll = F.cross_entropy(logits, targets.to(logits.device), reduction="sum")
    return nll, int(targets.numel())
