r"""The token trie of a task's answers: what both class-restricted heads append after a prompt.

For R answer token sequences :math:`s_r` (a class's label then the end token, or a label set's
canonical answer), node j is one distinct proper prefix :math:`s_r[{:}t]` (``t ≥ 1``): it holds
that prefix's last token and attends to the prompt and to its ancestors, at the position it would
have right after the prompt, so one forward scores every continuation (``scoring.attention``). A
prefix shared by several answers (``"1"`` in ``"1"`` / ``"10"``) is one node.

Teacher forcing reads answer r's step t from *state* ``src[r, t]`` (0: the prompt's answer
position, ``1 + j``: node j) at column ``tgt[r, t]`` of the allowed tokens ``A``; ``valid`` marks
the steps an answer has (answers differ in length). ``children[state, a]`` says token ``A[a]``
continues some answer from that state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["AnswerTrie"]


@dataclass(frozen=True)
class AnswerTrie:
    """The trie of R answers over N nodes, T the longest answer, A the allowed tokens.

    Attributes:
        node_tokens: ``[N]`` each node's token. node_depths: ``[N]`` its prefix length (1..T-1).
        node_ancestors: ``[N, N]`` bool, ``[j, i]``: node i is node j or an ancestor of it.
        allowed_ids: ``[A]`` the allowed token ids. src, tgt: ``[R, T]`` int64 (state, column of
        ``A``) of each step. valid: ``[R, T]`` bool. children: ``[1 + N, A]`` bool.
    """

    node_tokens: torch.Tensor
    node_depths: torch.Tensor
    node_ancestors: torch.Tensor
    allowed_ids: torch.Tensor
    src: torch.Tensor
    tgt: torch.Tensor
    valid: torch.Tensor
    children: torch.Tensor

    @classmethod
    def build(
        cls, answers: Sequence[Sequence[int]], allowed: Sequence[int], *, name: Callable[[int], str], task: str
    ) -> AnswerTrie:
        """The trie of ``answers`` (token id sequences, each non-empty) over the ``allowed`` tokens;
        ``name(r)`` says which answer r is in the error for a token outside ``allowed``."""
        allowed = [int(t) for t in allowed]
        where = {t: a for a, t in enumerate(allowed)}
        node_of: dict[tuple[int, ...], int] = {}
        tokens: list[int] = []
        parents: list[int] = []
        depths: list[int] = []
        seqs = [tuple(int(t) for t in s) for s in answers]
        for s in seqs:
            for t in range(1, len(s)):
                if s[:t] not in node_of:
                    node_of[s[:t]] = len(tokens)
                    tokens.append(s[t - 1])
                    parents.append(node_of[s[: t - 1]] if t > 1 else -1)
                    depths.append(t)
        n = len(tokens)
        T = max((len(s) for s in seqs), default=0)
        src = torch.zeros(len(seqs), T, dtype=torch.long)
        tgt = torch.zeros(len(seqs), T, dtype=torch.long)
        valid = torch.zeros(len(seqs), T, dtype=torch.bool)
        children = torch.zeros(1 + n, len(allowed), dtype=torch.bool)
        for r, s in enumerate(seqs):
            for t, tok in enumerate(s):
                if tok not in where:
                    raise ValueError(f"task {task!r}: {name(r)} token {tok} is not among the allowed tokens")
                state = 0 if t == 0 else 1 + node_of[s[:t]]
                src[r, t], tgt[r, t], valid[r, t] = state, where[tok], True
                children[state, where[tok]] = True
        ancestors = torch.zeros(n, n, dtype=torch.bool)
        for j in range(n):
            i = j
            while i >= 0:
                ancestors[j, i] = True
                i = parents[i]
        return cls(
            node_tokens=torch.tensor(tokens, dtype=torch.long),
            node_depths=torch.tensor(depths, dtype=torch.long),
            node_ancestors=ancestors,
            allowed_ids=torch.tensor(allowed, dtype=torch.long),
            src=src,
            tgt=tgt,
            valid=valid,
            children=children,
        )

    @classmethod
    def empty(cls) -> AnswerTrie:
        """No nodes: every answer is one token, read at the answer position alone."""
        return cls.build([], [], name=str, task="")
