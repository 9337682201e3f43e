"""Thin ``torch.nn.Module`` wrappers for the two training losses of JOMED.

- :class:`RetrievalKLLoss` — stage 2, the retriever's Sharp Perplexity Distillation loss
  (:func:`jomed_fast.ops.retrieval_kl_loss`): ``KL(softmax(r / tau_reader) || softmax(s / tau_retriever))``.
- :class:`HeadClassNLLLoss` — the reader's answer NLL over the task's class tokens only
  (:func:`jomed_fast.ops.head_class_log_softmax`), with the ``[N, V]`` logits never formed.

The modules hold configuration only (temperatures, reduction, class ids), check it once at
construction, and hand the tensors to the functional ops, which check them on every call.
"""

from __future__ import annotations

import torch

from ._checks import check_positive, check_same_device, check_tensor
from .retrieval_kl_loss import check_reduction, retrieval_kl_loss


class RetrievalKLLoss(torch.nn.Module):
    """``forward(retriever_scores [B, K], reader_log_likelihoods [B, K])`` -> float32 loss (``[B]``
    for ``reduction="none"``); gradient to the scores only. See :func:`retrieval_kl_loss`."""

    def __init__(self, tau_retriever: float = 1.0, tau_reader: float = 1.0, reduction: str = "batchmean"):
        super().__init__()
        self.tau_retriever = check_positive("tau_retriever", tau_retriever)
        self.tau_reader = check_positive("tau_reader", tau_reader)
        self.reduction = check_reduction("reduction", reduction)

    def forward(self, retriever_scores: torch.Tensor, reader_log_likelihoods: torch.Tensor) -> torch.Tensor:
        return retrieval_kl_loss(
            retriever_scores, reader_log_likelihoods, self.tau_retriever, self.tau_reader, self.reduction
        )

    def extra_repr(self) -> str:
        return f"tau_retriever={self.tau_retriever}, tau_reader={self.tau_reader}, reduction={self.reduction!r}"


class HeadClassNLLLoss(torch.nn.Module):
    """Mean NLL of the class-restricted posterior at the target classes.

    ``forward(hidden [N, H], weight [V, H], targets int64 [N], bias [V] | None)`` -> float32 scalar
    ``-mean_n log softmax_c(hidden @ weight[class_ids].T + bias[class_ids])[n, targets[n]]``, where
    ``targets`` index the C classes (``[0, C)``), not the vocabulary. Gradients reach hidden, weight
    and bias as :func:`jomed_fast.ops.head_class_log_softmax` gives them. With N = 0 the mean is NaN.

    ``class_ids`` (int64 ``[C]``, distinct, non-negative) is a non-persistent buffer: it follows
    ``.to(device)`` but is configuration, so it stays out of the state dict of the model that owns
    the loss. Out-of-range targets raise ``ValueError`` on the CPU in eager mode; on CUDA they are
    checked by a device-side assertion (no host sync in the forward), and under ``torch.compile`` the
    data-dependent CPU check is skipped (it would break the graph) and ``nll_loss`` reports them.
    """

    class_ids: torch.Tensor

    def __init__(self, class_ids: torch.Tensor):
        super().__init__()
        check_tensor("class_ids", class_ids)
        if class_ids.dtype != torch.int64:
            raise TypeError(f"class_ids: expected dtype int64, got {class_ids.dtype}")
        if class_ids.dim() != 1 or class_ids.numel() == 0:
            raise ValueError(f"class_ids: expected a non-empty 1-D tensor [C], got shape {tuple(class_ids.shape)}")
        if int(class_ids.min()) < 0:
            raise ValueError(f"class_ids: expected vocabulary ids >= 0, got min {int(class_ids.min())}")
        if torch.unique(class_ids).numel() != class_ids.numel():
            raise ValueError(f"class_ids: expected distinct ids, got duplicates in {class_ids.tolist()[:32]}")
        self.register_buffer("class_ids", class_ids.detach().clone(), persistent=False)

    def forward(
        self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        from .head_class_log_softmax import head_class_log_softmax

        check_tensor("hidden", hidden)
        check_tensor("targets", targets)
        if targets.dtype != torch.int64:
            raise TypeError(f"targets: expected dtype int64 (class indices in [0, C)), got {targets.dtype}")
        if targets.dim() != 1 or (hidden.dim() >= 1 and targets.shape[0] != hidden.shape[0]):
            raise ValueError(
                f"targets: expected shape [N] = ({hidden.shape[0] if hidden.dim() else '?'},) (the rows of hidden), "
                f"got {tuple(targets.shape)}"
            )
        check_same_device(hidden=hidden, targets=targets)
        num_classes = self.class_ids.shape[0]
        if targets.is_cuda:
            # checked on the device, no host sync: an out-of-range target fails the next synchronising
            # call with this message (nll_loss would fail there too, with a less specific one)
            torch._assert_async(
                ((targets >= 0) & (targets < num_classes)).all(),
                f"targets: expected class indices in [0, {num_classes}) (C={num_classes})",
            )
        elif not torch.compiler.is_compiling() and targets.numel() > 0:
            lo, hi = int(targets.min()), int(targets.max())
            if lo < 0 or hi >= num_classes:
                raise ValueError(
                    f"targets: expected class indices in [0, {num_classes}) (C={num_classes}), "
                    f"got min {lo} and max {hi}"
                )
        log_probs = head_class_log_softmax(hidden, weight, self.class_ids, bias)
        return torch.nn.functional.nll_loss(log_probs, targets)

    def extra_repr(self) -> str:
        return f"num_classes={self.class_ids.shape[0]}"
