r"""Open-ended VQA: greedy answers per candidate, fused by the paper's marginal or by a vote.

For one query with K candidates, candidate ``k``'s prompt (the layout's prompt with ``z_k``) is
decoded greedily through the unmodified Hugging Face ``generate`` (the K prompts of a query as one
left-padded batch, the model's KV-cache across steps) until the end-of-turn token or
``max_new_tokens``. Its answer ``a_k`` (decoded, special tokens dropped) comes with the mean
log-probability of its generated tokens (end-of-turn token included when reached)

.. math:: \bar\ell_k = \frac{1}{T_k} \sum_{t=1}^{T_k} \log p(y_t \mid y_{<t}, z_k, q)

and the K answers are fused with the weights :math:`w = \operatorname{softmax}(s / \tau)` by one
of two rules (``OPEN_FUSIONS``, ``InferConfig.open_fusion``):

``paper`` (default) — the paper's marginalisation over the retrieved pairs, with the K generated
answers (their token sequences :math:`y^{(j)}`, end-of-turn token included when reached) as the
answer set: every candidate's prompt scores every candidate's answer by teacher forcing,

.. math:: P(a_j \mid q) = \sum_k w_k \, p(y^{(j)} \mid z_k, q), \qquad
          p(y \mid z_k, q) = \prod_t p(y_t \mid y_{<t}, z_k, q),

answers that decode to one string pooled (disjoint token sequences: their probabilities add), and
the most probable string is the answer (:func:`paper_open_answer`; ``J <= K`` extra forwards of the
K prompts per query).

``vote`` — this project's rule, not the paper's: the normalised string with the largest summed
weight of per-candidate confidences

.. math:: \hat a = \arg\max_a \sum_{k:\, \mathrm{norm}(a_k) = a} w_k \exp(\bar\ell_k)

(``norm``: SQuAD normalisation, ``jomed_fast.tasks.normalize_open_answer``; :func:`fuse_open_answers`).
It needs no forward beyond the generations, but a candidate's answer counts only under its own
prompt. The answer reported for a group is its first member's raw text. Not done here: sharing the
prefix's KV-cache across the K generations (``generate`` runs every prompt in full; the
class-scoring path shares it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..prompts import as_image, build_messages
from ..tasks import normalize_open_answer

__all__ = [
    "OPEN_FUSIONS",
    "OpenAnswerer",
    "answer_log_likelihoods",
    "fuse_open_answers",
    "generate_answer_tokens",
    "generate_answers",
    "paper_open_answer",
]

OPEN_FUSIONS = ("paper", "vote")


class OpenAnswerer:
    """What ``infer.predict`` takes in place of a ``CandidateScorer`` for an open-VQA task (which
    has no class set to score): the reader, the task and the layout."""

    def __init__(self, reader, task, layout: str = "paper"):
        from ..prompts import LAYOUTS
        from ..tasks import get_task

        task = get_task(task) if isinstance(task, str) else task
        if not task.is_open:
            raise ValueError(f"task: {task.name!r} has a class set; score it with CandidateScorer instead")
        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
        self.reader, self.task, self.layout = reader, task, layout


def _prompt_inputs(reader, task, layout: str, query_image, question: str, candidates: Sequence) -> dict:
    """The K prompts of one query as one left-padded batch (the answer cue last in every row)."""
    qimg = None if query_image is None else as_image(query_image)
    batch = []
    for cand in candidates:
        messages, images = build_messages(layout, task, qimg, question, cand)
        batch.append(([as_image(i) for i in images], messages))
    return reader.encode_batch(batch, padding_side="left")


def _greedy(reader, inputs: dict, max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(generated tokens ``[K, T]``, their log-probs ``[K, T]``, the valid mask ``[K, T]``: tokens up
    to and including the first end-of-turn token)."""
    proc = reader.processor
    out = reader.hf_model.generate(
        **inputs,
        # an answer holding an image placeholder would take image features on teacher forcing
        suppress_tokens=_placeholder_tokens(reader) or None,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        output_scores=True,
        return_dict_in_generate=True,
        eos_token_id=proc.end_of_turn_token_id,
        pad_token_id=proc.pad_token_id,
    )
    new = out.sequences[:, inputs["input_ids"].shape[1] :]  # [K, T]
    logp = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1)  # [K, T, V]
    token_lp = logp.gather(-1, new[..., None])[..., 0]
    # count tokens up to and including the first end-of-turn token
    is_end = new == proc.end_of_turn_token_id
    after_end = (is_end.cumsum(1) - is_end.long()) > 0
    return new, token_lp, ~after_end


def _placeholder_tokens(reader) -> list[int]:
    """The token ids the model replaces with image (or video) features."""
    config = reader.hf_model.config
    return [
        t for t in (getattr(config, "image_token_id", None), getattr(config, "video_token_id", None)) if t is not None
    ]


@torch.no_grad()
def generate_answers(
    reader, task, layout: str, query_image, question: str, candidates: Sequence, max_new_tokens: int = 16
) -> tuple[list[str], torch.Tensor]:
    """Greedy answers of one query's K prompts: (K answer strings, mean token log-probs ``[K]``)."""
    answers, mean_lp, _ = generate_answer_tokens(
        reader, task, layout, query_image, question, candidates, max_new_tokens
    )
    return answers, mean_lp


@torch.no_grad()
def generate_answer_tokens(
    reader, task, layout: str, query_image, question: str, candidates: Sequence, max_new_tokens: int = 16
) -> tuple[list[str], torch.Tensor, list[list[int]]]:
    """:func:`generate_answers` with the K answers' token ids (end-of-turn token included when
    reached), which :func:`paper_open_answer` scores."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
    inputs = _prompt_inputs(reader, task, layout, query_image, question, candidates)
    new, token_lp, valid = _greedy(reader, inputs, max_new_tokens)
    mean_lp = (token_lp * valid).sum(1) / valid.sum(1).clamp(min=1)
    tokens = [row[valid[k]].tolist() for k, row in enumerate(new)]
    answers = [reader.processor.decode(t, skip_special_tokens=True).strip() for t in tokens]
    return answers, mean_lp, tokens


def _append_answer(inputs: dict, y: torch.Tensor) -> dict:
    """``inputs`` with the answer tokens ``y [T]`` after every row: the ids, an attention mask of
    ones, and 0 (a text token) in every other per-token tensor (Qwen2-VL's ``mm_token_type_ids``)."""
    ids = inputs["input_ids"]
    out = dict(inputs)
    for name, t in inputs.items():
        if not isinstance(t, torch.Tensor) or t.shape != ids.shape:
            continue
        if name == "input_ids":
            tail = y.expand(ids.shape[0], -1)
        elif name == "attention_mask":
            tail = torch.ones(ids.shape[0], y.numel(), dtype=t.dtype, device=t.device)
        else:
            tail = torch.zeros(ids.shape[0], y.numel(), dtype=t.dtype, device=t.device)
        out[name] = torch.cat([t, tail], 1)
    return out


@torch.no_grad()
def answer_log_likelihoods(reader, inputs: dict, answer_tokens: Sequence[Sequence[int]]) -> torch.Tensor:
    r"""``[K, J]``: :math:`\log p(y^{(j)} \mid \text{prompt}_k)`, the teacher-forced log-likelihood
    of each answer's tokens after each of the K left-padded prompts in ``inputs``."""
    ids = inputs["input_ids"]
    K, L = ids.shape
    out = torch.empty(K, len(answer_tokens), dtype=torch.float64)
    for j, answer in enumerate(answer_tokens):
        y = torch.tensor(list(answer), dtype=ids.dtype, device=ids.device)
        if y.numel() == 0:
            raise ValueError(f"answer_tokens: answer {j} has no token")
        if set(answer) & set(_placeholder_tokens(reader)):
            raise ValueError(f"answer_tokens: answer {j} holds an image placeholder token ({list(answer)})")
        forced = _append_answer(inputs, y)
        # the prompt's last position predicts y_1, the answer's t-th position predicts y_{t+1}
        logits = reader.hf_model(**forced, use_cache=False).logits[:, L - 1 : L - 1 + y.numel()]
        lp = torch.log_softmax(logits.double(), -1).gather(-1, y.expand(K, -1)[..., None])[..., 0]
        out[:, j] = lp.sum(1).cpu()
    return out


@torch.no_grad()
def paper_open_answer(
    reader,
    task,
    layout: str,
    query_image,
    question: str,
    candidates: Sequence,
    answer_tokens: Sequence[Sequence[int]],
    weights: torch.Tensor,
) -> tuple[str, dict]:
    r"""The paper's marginal over one query's candidate answers (module docstring): (the most
    probable answer string, {answer string: :math:`\sum_k w_k p(a \mid z_k, q)`}). ``answer_tokens``:
    the K generated answers' token ids (end-of-turn token included when reached)."""
    if not (len(candidates) == len(answer_tokens) == weights.numel()):
        raise ValueError(
            f"candidates, answer_tokens, weights: expected K entries each, got {len(candidates)}, "
            f"{len(answer_tokens)}, {weights.numel()}"
        )
    distinct = list(dict.fromkeys(tuple(t) for t in answer_tokens))  # first-seen order
    inputs = _prompt_inputs(reader, task, layout, query_image, question, candidates)
    lp = answer_log_likelihoods(reader, inputs, distinct)  # [K, J]
    marginal = (weights.double().cpu()[:, None] * lp.exp()).sum(0)  # [J]
    probs: dict[str, float] = {}
    for tokens, p in zip(distinct, marginal.tolist()):
        text = reader.processor.decode(list(tokens), skip_special_tokens=True).strip()
        probs[text] = probs.get(text, 0.0) + p
    return max(probs, key=lambda a: probs[a]), probs


def fuse_open_answers(answers: Sequence[str], mean_log_probs: torch.Tensor, weights: torch.Tensor) -> tuple[str, dict]:
    """(fused answer, {normalised answer: summed weight}) for one query's K answers."""
    if not (len(answers) == mean_log_probs.numel() == weights.numel()):
        raise ValueError(
            f"answers, mean_log_probs, weights: expected K entries each, got {len(answers)}, "
            f"{mean_log_probs.numel()}, {weights.numel()}"
        )
    votes: dict[str, float] = {}
    first: dict[str, str] = {}
    for a, lp, w in zip(answers, mean_log_probs.tolist(), weights.tolist()):
        key = normalize_open_answer(a)
        votes[key] = votes.get(key, 0.0) + w * float(torch.tensor(lp).exp())
        first.setdefault(key, a)
    best = max(votes, key=lambda k: votes[k])
    return first[best], votes
