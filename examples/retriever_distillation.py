"""REPLUG / ATLAS-style retriever distillation with ``jomed_fast.ops.retrieval_kl_loss``.

A tiny text retriever (an unmodified ``transformers.BertModel`` from a small ``BertConfig``, random
weights, mean-pooled and L2-normalised) searches a toy corpus of 64 reports, one per (organ,
finding) pair. For each training query it retrieves its top K with ``ops.topk_similarity``; a
frozen reader scores the K candidates (here a hand-written rule: log-likelihood 0 when the passage holds
the query's organ and finding, ``MISS`` otherwise, what an answer's likelihood does with a passage
that contains the answer); the query encoder learns to match the reader's posterior over them:

    loss = KL( softmax(r / tau_reader) || softmax(s / tau_retriever) )     r, s: [B, K]

The passage side is a frozen copy of the initial encoder (the index is built once, as in REPLUG).
Recall@k is measured on held-out phrasings of the queries before and after; the script exits 1
unless it improved.

    python examples/retriever_distillation.py
"""

from __future__ import annotations

import copy
import sys

import torch
from transformers import BertConfig, BertModel

from jomed_fast import ops

ORGANS = ["lung", "liver", "kidney", "heart", "brain", "skin", "bone", "breast"]
FINDINGS = ["nodule", "mass", "cyst", "effusion", "fracture", "edema", "lesion", "tumor"]
PASSAGE = "report : the {organ} scan shows a {finding} and nothing else"
TRAIN_QUERIES = ["which report has a {finding} in the {organ}", "{organ} with a {finding}"]
TEST_QUERIES = ["find the {organ} case that shows a {finding}"]  # phrasing never trained on
K, RECALL_AT, STEPS, BATCH, MISS = 8, 5, 150, 16, -8.0
TAU_RETRIEVER, TAU_READER = 0.05, 1.0

PAIRS = [(o, f) for o in ORGANS for f in FINDINGS]  # passage i is about PAIRS[i]
VOCAB = {"[PAD]": 0}
for text in [PASSAGE, *TRAIN_QUERIES, *TEST_QUERIES, *ORGANS, *FINDINGS]:
    for word in text.split():
        VOCAB.setdefault(word, len(VOCAB))


def encode_texts(texts: list[str]) -> dict[str, torch.Tensor]:
    """Word-level ids padded to the longest: the tokenizer is not what this example is about."""
    rows = [[VOCAB[w] for w in t.split()] for t in texts]
    L = max(map(len, rows))
    ids = torch.tensor([r + [0] * (L - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def embed(encoder: BertModel, texts: list[str]) -> torch.Tensor:
    """[len(texts), D]: the mean of the last hidden states over real tokens, unit length."""
    batch = encode_texts(texts)
    hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def queries(templates: list[str]) -> tuple[list[str], torch.Tensor]:
    texts, gold = [], []
    for t in templates:
        for i, (organ, finding) in enumerate(PAIRS):
            texts.append(t.format(organ=organ, finding=finding))
            gold.append(i)
    return texts, torch.tensor(gold)


@torch.no_grad()
def recall_at(encoder: BertModel, index: torch.Tensor, texts: list[str], gold: torch.Tensor, k: int) -> float:
    _, ids = ops.topk_similarity(embed(encoder.eval(), texts), index, k)  # [Q, k]
    return float((ids == gold[:, None]).any(dim=1).float().mean())


def main() -> int:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    query_encoder = BertModel(config, add_pooling_layer=False)
    passage_encoder = copy.deepcopy(query_encoder).eval().requires_grad_(False)
    with torch.no_grad():
        index = embed(passage_encoder, [PASSAGE.format(organ=o, finding=f) for o, f in PAIRS])  # [N, D]

    train_texts, train_gold = queries(TRAIN_QUERIES)
    test_texts, test_gold = queries(TEST_QUERIES)
    before = {k: recall_at(query_encoder, index, test_texts, test_gold, k) for k in (1, RECALL_AT)}
    print(f"before: recall@1 {before[1]:.3f}  recall@{RECALL_AT} {before[RECALL_AT]:.3f}  (held-out phrasing)")

    optimizer = torch.optim.AdamW(query_encoder.parameters(), lr=1e-3)
    for step in range(STEPS):
        query_encoder.train()
        pick = torch.randint(len(train_texts), (BATCH,))
        q = embed(query_encoder, [train_texts[i] for i in pick])  # [B, D]
        with torch.no_grad():
            _, candidates = ops.topk_similarity(q, index, K)  # [B, K] retrieved with the current encoder
        scores = torch.einsum("bd,bkd->bk", q, index[candidates])  # [B, K], differentiable in q
        # the frozen reader: does the candidate hold the answer?
        reader = torch.where(candidates == train_gold[pick][:, None], 0.0, MISS)
        loss = ops.retrieval_kl_loss(scores, reader, tau_retriever=TAU_RETRIEVER, tau_reader=TAU_READER)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 30 == 0 or step == STEPS - 1:
            print(f"step {step:3d}  KL {loss.item():.4f}")

    after = {k: recall_at(query_encoder, index, test_texts, test_gold, k) for k in (1, RECALL_AT)}
    print(f"after:  recall@1 {after[1]:.3f}  recall@{RECALL_AT} {after[RECALL_AT]:.3f}")
    if after[RECALL_AT] <= before[RECALL_AT]:
        print(f"recall@{RECALL_AT} did not improve", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
