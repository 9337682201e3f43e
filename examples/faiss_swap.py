"""Swap ``faiss.IndexFlatIP`` for ``jomed_fast.index.FlatIndex`` in a retrieval loop written for faiss.

A random corpus of unit vectors [N, D] with a label per row, queries [Q, D]; the loop adds the
corpus in blocks, searches the queries in batches and labels each query by a score-weighted vote of
its k neighbours. It runs once on faiss and once, unchanged, on FlatIndex (fp32 storage, so both
search the same numbers), and exits 1 unless the neighbour ids and the votes are identical.

    python examples/faiss_swap.py

FlatIndex stores fp16 by default (the project's index storage, half the bytes); pass
``dtype=torch.float32`` to match faiss's fp32 scores, as here.
"""

from __future__ import annotations

import sys
import time

import faiss
import numpy as np
import torch

from jomed_fast.index import FlatIndex

N, D, Q, K, CLASSES = 20_000, 128, 256, 10, 8


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)  # inner product = cosine, as for embeddings


def retrieve_and_vote(index, corpus, labels, queries, k=K, add_block=5_000, batch=64):
    """Plain faiss code: only the index object it is given differs between the two runs."""
    for lo in range(0, len(corpus), add_block):
        index.add(corpus[lo : lo + add_block])
    assert index.ntotal == len(corpus)
    all_ids, votes = [], []
    for lo in range(0, len(queries), batch):
        scores, ids = index.search(queries[lo : lo + batch], k)
        weights = np.exp(scores)
        per_class = np.stack([(weights * (labels[ids] == c)).sum(axis=1) for c in range(CLASSES)], axis=1)
        votes.append(per_class.argmax(axis=1))
        all_ids.append(ids)
    return np.concatenate(all_ids), np.concatenate(votes)


def main() -> int:
    rng = np.random.default_rng(0)
    corpus, queries = unit_rows(rng, N, D), unit_rows(rng, Q, D)
    labels = rng.integers(0, CLASSES, size=N)

    # The first FlatIndex search imports jomed_fast.ops and registers its torch.library ops (~1 s):
    # done once here so that the timings below compare searches only.
    warm_up = FlatIndex(D)
    warm_up.add(corpus[:1])
    warm_up.search(queries[:1], 1)

    runs = {}
    for name, index in (("faiss.IndexFlatIP", faiss.IndexFlatIP(D)), ("FlatIndex", FlatIndex(D, dtype=torch.float32))):
        start = time.perf_counter()
        runs[name] = retrieve_and_vote(index, corpus, labels, queries)
        print(f"{name:18s} {time.perf_counter() - start:6.3f} s  ({Q} queries, N={N}, D={D}, k={K})")

    (faiss_ids, faiss_votes), (flat_ids, flat_votes) = runs.values()
    if not np.array_equal(faiss_ids, flat_ids):
        differing = int((faiss_ids != flat_ids).any(axis=1).sum())
        print(f"ids differ for {differing} of {Q} queries", file=sys.stderr)
        return 1
    if not np.array_equal(faiss_votes, flat_votes):
        print("votes differ", file=sys.stderr)
        return 1
    print(f"identical ids and votes for all {Q} queries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
