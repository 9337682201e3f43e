r"""Open-ended VQA: greedy answers per candidate, fused over identical normalised strings.

For one query with K candidates, candidate ``k``'s prompt (the layout's prompt with ``z_k``) is
decoded greedily through the unmodified Hugging Face ``generate`` (the K prompts of a query as one
left-padded batch, the model's KV-cache across steps) until the end-of-turn token or
``max_new_tokens``. Its answer ``a_k`` (decoded, special tokens dropped) comes with the mean
log-probability of its generated tokens (end-of-turn token included when reached)

.. math:: \bar\ell_k = \frac{1}{T_k} \sum_{t=1}^{T_k} \log p(y_t \mid y_{<t}, z_k, q)

and the fused answer is the normalised string with the largest summed weight

.. math:: \hat a = \arg\max_a \sum_{k:\, \mathrm{norm}(a_k) = a} w_k \exp(\bar\ell_k),
          \qquad w = \operatorname{softmax}(s / \tau)

(``norm``: SQuAD normalisation, ``jomed_fast.tasks.normalize_open_answer``). The answer reported
for a group is its first member's raw text. Not done here: sharing the prefix's KV-cache across
the K generations (``generate`` runs every prompt in full; the class-scoring path shares it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..prompts import as_image, build_messages
from ..tasks import normalize_open_answer

__all__ = ["OpenAnswerer", "fuse_open_answers", "generate_answers"]


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


@torch.no_grad()
def generate_answers(
    reader, task, layout: str, query_image, question: str, candidates: Sequence, max_new_tokens: int = 16
) -> tuple[list[str], torch.Tensor]:
    """Greedy answers of one query's K prompts: (K answer strings, mean token log-probs ``[K]``)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
    qimg = None if query_image is None else as_image(query_image)
    batch = []
    for cand in candidates:
        messages, images = build_messages(layout, task, qimg, question, cand)
        batch.append(([as_image(i) for i in images], messages))
    inputs = reader.encode_batch(batch, padding_side="left")
    proc = reader.processor
    out = reader.hf_model.generate(
        **inputs,
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
    valid = ~after_end
    mean_lp = (token_lp * valid).sum(1) / valid.sum(1).clamp(min=1)
    answers = [proc.decode(row[valid[k]].tolist(), skip_special_tokens=True).strip() for k, row in enumerate(new)]
    return answers, mean_lp


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
