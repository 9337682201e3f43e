r"""Multi-label scores from the reader's hidden states: the label-set head.

A multi-label answer is a *set* of labels, written as the task's canonical answer
(``Task.format_answer``, what stage 1 trains the reader to emit): the labels in increasing class
order, joined by the separator, closed by the end-of-answer token (``"0, 3, 14<end>"``). The
*answer language* :math:`\mathcal{S}` is every non-empty set of at most ``M = max_labels`` labels
(all :math:`2^C - 1` sets when ``max_labels`` is None), each as its one token sequence
:math:`s_S = ` ``verbalizer.target_ids(S)``.

The reader's **restricted answer** is what it emits when decoding is constrained to
:math:`\mathcal{S}`: at every step the softmax is taken over the tokens that continue some answer
of the language (the trie children of the prefix so far, ``ch(prefix)``)::

    log p(S | prompt) = Σ_t [ z_t[s_S[t]] − logsumexp_{u ∈ ch(s_S[:t])} z_t[u] ]      [R, |S|]

with ``z_t = h_t · Wᵀ`` the logits after ``s_S[:t]`` (``h_0 = h_ans``). A step with one child (a
separator's forced second token, the end after the M-th label) contributes exactly 0. The
children's probabilities sum to 1 at every node and every path ends in a complete answer, so
``p(· | prompt)`` is a probability distribution over :math:`\mathcal{S}` (it sums to 1; no
renormalisation over sets is needed or done) — the probability that sampling the reader under
this constraint writes exactly S.

Per-label scores are the **marginals** of that distribution, the probability that label c is in
the reader's restricted answer::

    p(c ∈ S | prompt) = Σ_{S ∈ 𝒮, c ∈ S} p(S | prompt)                                  [R, C]

Each is a probability (a sum of disjoint events' probabilities, in [0, 1]); they are not forced to
sum to 1: their sum is the expected number of labels, ``E|S| ≥ 1``. ``scores`` returns their logs.
Fusing marginals over candidates with weights that sum to 1 gives the marginals of the fused
(mixture) answer distribution, so ``ops.fuse_candidates`` applies unchanged.

Computation: the continuations of all answers run after the prompt as one *token trie* (node j =
a distinct proper prefix of some :math:`s_S`, attending to the prompt and to its ancestors, as in
``class_head``); ``ops.head_class_log_softmax`` gives ``log_softmax_A`` over the task's allowed
tokens ``A`` at the answer position and every node; renormalising over a node's children removes
the per-row constant, which gives the children's softmax exactly. Cost: one appended token per
trie node; for C = 15 single- or two-token labels and ``M = 3`` that is 575 answers and a few
thousand nodes per candidate — ``max_labels`` trades that cost for the longest answer scored.
"""

from __future__ import annotations

import itertools
from math import comb

import torch

from .. import ops
from .._checks import is_int
from .answer_trie import AnswerTrie

__all__ = ["DEFAULT_MAX_LABELS", "LabelSetHead", "label_sets"]

DEFAULT_MAX_LABELS = 3
MODE = "label_sets"


def label_sets(num_classes: int, max_labels: int | None) -> tuple[tuple[int, ...], ...]:
    """Every non-empty set of at most ``max_labels`` of ``num_classes`` labels, as increasing
    tuples, by size then lexicographically (None: every size)."""
    top = num_classes if max_labels is None else min(int(max_labels), num_classes)
    return tuple(s for m in range(1, top + 1) for s in itertools.combinations(range(num_classes), m))


def _check_max_labels(max_labels) -> None:
    if max_labels is None:
        return
    if not is_int(max_labels) or max_labels < 1:
        raise ValueError(f"max_labels: expected a positive int or None (every size), got {max_labels!r}")


class LabelSetHead:
    """The answer-set distribution and per-label marginals of a multi-label task (module docstring).

    Exposes what the scorer needs of a head: ``mode``, ``normalize``, ``num_classes``, the trie
    (``node_tokens``, ``node_depths``, ``node_ancestors``, ``num_nodes``), ``to`` and ``scores``;
    plus ``sets`` (the language, in column order of ``set_log_probs``) and ``membership``.
    """

    mode = MODE
    normalize = True  # the set distribution is normalised by construction

    def __init__(self, verbalizer, max_labels: int | None = DEFAULT_MAX_LABELS):
        if not verbalizer.is_multilabel:
            raise ValueError(f"verbalizer: expected a multi-label task's, got task {verbalizer.task_name!r}")
        _check_max_labels(max_labels)
        self.verbalizer = verbalizer
        self.max_labels = max_labels
        self.num_classes = C = verbalizer.num_classes
        self.sets = label_sets(C, max_labels)
        self._set_index = {frozenset(s): i for i, s in enumerate(self.sets)}
        seqs = [tuple(verbalizer.target_ids(list(s))) for s in self.sets]
        if len(set(seqs)) != len(seqs):
            raise ValueError(f"task {verbalizer.task_name!r}: two label sets share one answer token sequence")

        sets = self.sets
        trie = AnswerTrie.build(
            seqs,
            verbalizer.allowed_token_ids,
            name=lambda i: f"answer {list(sets[i])}",
            task=verbalizer.task_name,
        )
        member = torch.zeros(len(seqs), C, dtype=torch.bool)
        for i, s in enumerate(sets):
            member[i, list(s)] = True
        self.node_tokens = trie.node_tokens
        self.node_depths = trie.node_depths
        self.node_ancestors = trie.node_ancestors  # [N, N]: anc[j, i] = node i is node j or an ancestor of it
        self.allowed_ids = trie.allowed_ids
        self.children = trie.children  # [1 + N, A]; state 0 is the answer position, state 1 + j trie node j
        self.membership = member  # [|S|, C]
        self._src, self._tgt, self._valid = trie.src, trie.tgt, trie.valid

    @property
    def num_nodes(self) -> int:
        """N: the trie's nodes, i.e. tokens appended after every prompt."""
        return int(self.node_tokens.numel())

    @property
    def num_sets(self) -> int:
        return len(self.sets)

    @staticmethod
    def count_sets(num_classes: int, max_labels: int | None) -> int:
        """``|𝒮|`` without building it: ``Σ_{m ≤ M} C choose m``."""
        top = num_classes if max_labels is None else min(max_labels, num_classes)
        return sum(comb(num_classes, m) for m in range(1, top + 1))

    def set_index(self, labels) -> int:
        """The column of ``set_log_probs`` holding the answer ``labels`` (an iterable of class indices)."""
        key = frozenset(int(c) for c in labels)
        try:
            return self._set_index[key]
        except KeyError:
            size = len(key)
            why = (
                f"it has {size} labels and max_labels is {self.max_labels}"
                if self.max_labels is not None and size > self.max_labels
                else f"expected a non-empty set of class indices in 0..{self.num_classes - 1}"
            )
            raise ValueError(
                f"labels: {sorted(key)} is not an answer of task {self.verbalizer.task_name!r}'s scored language: {why}"
            ) from None

    def to(self, device) -> "LabelSetHead":
        for name in (
            "allowed_ids",
            "children",
            "membership",
            "_src",
            "_tgt",
            "_valid",
            "node_tokens",
            "node_depths",
            "node_ancestors",
        ):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def set_log_probs(
        self, hidden_answer: torch.Tensor, hidden_nodes: torch.Tensor | None, weight: torch.Tensor
    ) -> torch.Tensor:
        """``log p(S | prompt)`` float32 ``[R, |S|]`` from ``hidden_answer [R, H]``, ``hidden_nodes
        [R, N, H]`` and the LM-head ``weight [V, H]`` (columns in ``sets`` order)."""
        if hidden_nodes is None:
            raise ValueError("hidden_nodes: expected [R, N, H] for the label-set trie, got None")
        R, H = hidden_answer.shape
        states = torch.cat([hidden_answer[:, None], hidden_nodes], dim=1)  # [R, 1 + N, H]
        lp = ops.head_class_log_softmax(states.reshape(-1, H), weight, self.allowed_ids)
        lp = lp.view(R, 1 + self.num_nodes, -1)  # [R, 1 + N, A]
        norm = lp.masked_fill(~self.children, float("-inf")).logsumexp(-1)  # [R, 1 + N]
        per_step = lp[:, self._src, self._tgt] - norm[:, self._src]  # [R, |S|, T]
        return per_step.masked_fill(~self._valid, 0.0).sum(-1)

    def marginals(self, set_log_probs: torch.Tensor) -> torch.Tensor:
        """``log p(c ∈ S)`` ``[..., C]`` from ``log p(S)`` ``[..., |S|]`` (a log-sum over the sets holding c)."""
        if set_log_probs.shape[-1] != self.num_sets:
            raise ValueError(
                f"set_log_probs: expected a last dimension of {self.num_sets} (the label sets), "
                f"got shape {tuple(set_log_probs.shape)}"
            )
        member = self.membership.to(set_log_probs.device)
        terms = set_log_probs.unsqueeze(-1).masked_fill(~member, float("-inf"))  # [..., |S|, C]
        return terms.logsumexp(-2)

    def scores(
        self, hidden_answer: torch.Tensor, hidden_nodes: torch.Tensor | None, weight: torch.Tensor
    ) -> torch.Tensor:
        """Per-label log marginals ``log p(c ∈ S | prompt)`` float32 ``[R, C]``."""
        return self.marginals(self.set_log_probs(hidden_answer, hidden_nodes, weight))
