r"""Class scores from the reader's hidden states: the class-restricted head.

Two modes (``ClassHead.mode``):

``first_token`` (every class is one token, the usual case: ``"Yes"``/``"No"``, single digits)::

    log p(c | prompt) = log_softmax_c( h_ans · W[class_id_c] )          [R, C]

with ``h_ans`` the final hidden state at the prompt's last token, computed by
``ops.head_class_log_softmax`` (only the C class rows of the LM head are read).

``sequence`` (some class is several tokens: ``"10"`` split into digits, ``"benign"``): class c is
the token sequence ``s_c = verbalizer.sequence(c)`` (its label tokens, then the end-of-answer token,
which tells ``"1"`` from ``"10"``), scored by teacher forcing with the softmax restricted at every
step to the task's allowed tokens ``A`` (``verbalizer.allowed_token_ids``)::

    raw_c = Σ_t log_softmax_A( h_t · W[A] )[s_c[t]]   h_0 = h_ans, h_t = hidden after s_c[:t]

and ``normalize=True`` (the default) returns ``log_softmax_c(raw_c)`` (a distribution over the
C classes, what fusion and the retrieval loss need); ``normalize=False`` returns ``raw``.

The continuations of all classes are run together, after the prompt, as a *token trie*: one node
per distinct proper prefix ``s_c[:t]`` (t ≥ 1) of a class sequence; node j holds its last token and
attends to the prompt and to its ancestors only, at the position it would have right after the
prompt. A class prefix shared by several classes (``"1"`` in ``"1"``/``"10"``) is one node.
"""

from __future__ import annotations

import torch

from .. import ops
from .answer_trie import AnswerTrie

MODES = ("auto", "first_token", "sequence")


class ClassHead:
    """How a task's classes are read from hidden states (see the module docstring)."""

    def __init__(self, verbalizer, mode: str = "auto", normalize: bool = True):
        if mode not in MODES:
            raise ValueError(f"class_mode: expected one of {MODES}, got {mode!r}")
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize: expected a bool, got {type(normalize).__name__}")
        self.verbalizer = verbalizer
        self.normalize = normalize
        if mode == "auto":
            mode = "first_token" if verbalizer.single_token else "sequence"
        if mode == "first_token":
            self.class_ids = torch.tensor(verbalizer.class_token_ids, dtype=torch.long)  # raises on shared firsts
        self.mode = mode
        self.num_classes = verbalizer.num_classes

        # the trie (sequence mode): every class's continuation run after the prompt
        if mode == "sequence":
            labels = verbalizer.labels
            trie = AnswerTrie.build(
                [verbalizer.sequence(c) for c in range(self.num_classes)],
                verbalizer.allowed_token_ids,
                name=lambda c: f"class {labels[c]!r}",
                task=verbalizer.task_name,
            )
            self.allowed_ids = trie.allowed_ids
            self._src, self._tgt, self._valid = trie.src, trie.tgt, trie.valid
        else:
            trie = AnswerTrie.empty()
        self.node_tokens = trie.node_tokens
        self.node_depths = trie.node_depths
        self.node_ancestors = trie.node_ancestors  # [N, N]: anc[j, i] = node i is node j or an ancestor of it

    @property
    def num_nodes(self) -> int:
        """N: the trie's nodes, i.e. tokens appended after every prompt (0 in ``first_token`` mode)."""
        return int(self.node_tokens.numel())

    def to(self, device) -> "ClassHead":
        for name in (
            "class_ids",
            "allowed_ids",
            "_src",
            "_tgt",
            "_valid",
            "node_tokens",
            "node_depths",
            "node_ancestors",
        ):
            if hasattr(self, name):
                setattr(self, name, getattr(self, name).to(device))
        return self

    def scores(
        self, hidden_answer: torch.Tensor, hidden_nodes: torch.Tensor | None, weight: torch.Tensor
    ) -> torch.Tensor:
        """``hidden_answer [R, H]``, ``hidden_nodes [R, N, H]`` (sequence mode), LM-head ``weight
        [V, H]`` -> float32 ``[R, C]``."""
        if self.mode == "first_token":
            return ops.head_class_log_softmax(hidden_answer, weight, self.class_ids)
        if hidden_nodes is None:
            raise ValueError("hidden_nodes: expected [R, N, H] in sequence mode, got None")
        R, H = hidden_answer.shape
        states = torch.cat([hidden_answer[:, None], hidden_nodes], dim=1)  # [R, 1 + N, H]
        lp = ops.head_class_log_softmax(states.reshape(-1, H), weight, self.allowed_ids)
        lp = lp.view(R, 1 + self.num_nodes, -1)  # [R, 1 + N, A]
        per_step = lp[:, self._src, self._tgt]  # [R, C, T]
        raw = per_step.masked_fill(~self._valid, 0.0).sum(-1)
        return torch.log_softmax(raw, dim=-1) if self.normalize else raw
