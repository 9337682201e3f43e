r"""Stage 2's model side, for one head: the trained query encoder, the candidate encoder (a
frozen copy of the learned encoder, re-copied by ``refresh``: the reference's ``base_retriever``)
and the query that retrieves the training candidates from it (``candidate_queries``: by default
mixed with the frozen initial encoder as the trained score is, as the reference's
``_image_retrieve`` does), the batch (candidates from the index, the reader's gold scores through
the score cache, the candidates' fixed embeddings), and the evaluation (KL, top-1 agreement, the fused accuracy of
the head alone and, with a :class:`Partner` — the other head as inference runs it — of the whole
system). Used by :mod:`.retriever` (the trainer).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from .. import ops
from .._checks import check_int
from ..candidate_retrieval import Retrieved
from ..identity import json_digest
from ..retriever.dual import QueryEncoder
from .candidate_dedup import dedup_key, first_distinct
from .data_order import epoch_batches
from .loop import encoder_fingerprint
from .pair_scores import CandidateKeys, PairScores
from .retriever_data import QuerySet
from .retriever_diagnostics import distinct_records, per_class_distinct, reader_right
from .retriever_loss import gold_scores, retriever_scores, top1_agreement

__all__ = ["HeadModel", "Partner", "evaluate_retriever"]


@dataclasses.dataclass(frozen=True)
class Partner:
    """The other head as inference runs it: its query ``encoder`` (a ``QueryEncoder``, or a base
    encoder with ``encode_images``; frozen here) and how many candidates ``k`` it brings."""

    encoder: Any
    k: int

    def __post_init__(self) -> None:
        check_int("partner.k", self.k, 1)
        if not (isinstance(self.encoder, QueryEncoder) or hasattr(self.encoder, "encode_images")):
            raise TypeError(
                f"partner.encoder: expected a QueryEncoder or an encoder with encode_images, "
                f"got {type(self.encoder).__name__}"
            )

    @torch.no_grad()
    def embed(self, images: list) -> torch.Tensor:
        if isinstance(self.encoder, QueryEncoder):
            return self.encoder(images)
        return self.encoder.encode_images(images)

    def fingerprint(self) -> str:
        return json_digest({"encoder": encoder_fingerprint(self.encoder), "k": self.k})


# ------------------------------------------------------------------------------------------ model
class HeadModel:
    """One head's model side: the query encoder, the candidate encoder, retrieval and reader scores."""

    def __init__(self, config, encoder: QueryEncoder, retrieval, pairs: PairScores, partner: Partner | None = None):
        self.config, self.encoder, self.partner, self.retrieval, self.pairs = config, encoder, partner, retrieval, pairs
        self.candidate_keys = CandidateKeys(retrieval)
        self.candidate_encoder = copy.deepcopy(encoder.learned).eval().requires_grad_(False)
        trainable = [(n, p) for n, p in encoder.learned.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("retriever: no trainable parameters (n_trainable = 0?)")
        self.trainable = [p for _, p in trainable]
        cand = dict(self.candidate_encoder.named_parameters())
        self.params = {f"learned.{n}": p for n, p in trainable}
        self.params.update({f"candidate_encoder.{n}": cand[n] for n, _ in trainable})
        self._dedup_keys: dict[int, object] = {}
        # copies of a caption / image left out of the candidates (``candidate_dedup.first_distinct``)
        self.dedup = {"removed": 0, "kept": 0, "queries_short": 0, "queries": 0}

    def refresh(self) -> None:
        """Copy the learned encoder into the candidate encoder (the reference's base-retriever update)."""
        with torch.no_grad():
            self.candidate_encoder.load_state_dict(self.encoder.learned.state_dict())

    def _rows(self, queries: QuerySet, idx: list[int], images: list, got) -> torch.Tensor:
        return self.pairs.rows(
            [queries.keys[i] for i in idx],
            images,
            queries.questions_of(idx),
            self.candidate_keys(got.ids),
            got.candidates,
        )

    @torch.no_grad()
    def candidate_queries(self, images: list) -> torch.Tensor:
        r"""``[B, D]``: the query that retrieves the training candidates. ``candidate_query="mixed"``
        (default): :math:`\mathrm{norm}(\alpha f_{stale}(x) + (1-\alpha) f_0(x))`, the trained
        score's mix (``QueryEncoder``) with the candidate encoder in place of the learned one, as
        the reference's ``partial_encoding(base_retriever, passage_encoder_for_train)`` (its mix is
        not normalised; a positive factor per query leaves its top-k the same). ``"unmixed"``, or
        ``alpha`` None: :math:`f_{stale}(x)` alone."""
        q = self.candidate_encoder.encode_images(images)
        alpha = self.encoder.alpha
        if self.config.candidate_query == "unmixed" or alpha is None:
            return q
        q0 = self.encoder.frozen.encode_images(images)
        return F.normalize(alpha * q + (1 - alpha) * q0, dim=-1)

    def _search(self, q: torch.Tensor, k: int, records: list | None):
        cfg = self.config
        kt, ki = (k, 0) if cfg.head == "text" else (0, k)
        return self.retrieval.search(q, k_text=kt, k_image=ki, queries=records)

    def _dedup_key(self, row: int):
        if row not in self._dedup_keys:
            self._dedup_keys[row] = dedup_key(self.retrieval.records[row], self.config.head)
        return self._dedup_keys[row]

    def candidates(self, images: list, records: list | None = None):
        """The top ``config.k`` of the trained head for ``candidate_queries(images)`` (``Retrieved``),
        without the query ``records``' own index rows (``None``: every row). With
        ``dedup_candidates``, the first of each caption (text head) or image (image head) only, the
        list filled from further down (:mod:`.candidate_dedup`): the search widens (doubling) until
        every query has ``k`` distinct rows or the whole index is searched; the removed copies are
        counted in :attr:`dedup`."""
        k = self.config.k
        q = self.candidate_queries(images)
        count = self.retrieval.excluded
        got = self._search(q, k, records)
        if not self.config.dedup_candidates:
            return got
        limit = self.retrieval.index.count - (int(got.excluded.max()) if got.excluded.numel() else 0)
        wide = k
        while True:
            positions, removed, kept, short = first_distinct(got.ids.tolist(), self._dedup_key, k)
            if not short or wide >= limit:
                break
            wide = min(limit, 2 * wide)
            after = dataclasses.replace(count)
            got = self._search(q, wide, records)
            # one batch's leave-self-out counted once, however often it is searched
            for f in dataclasses.fields(count):
                setattr(count, f.name, getattr(after, f.name))
        self.dedup["removed"] += removed
        self.dedup["kept"] += kept
        self.dedup["queries_short"] += short
        self.dedup["queries"] += len(positions)
        pos = torch.tensor(positions, dtype=torch.long, device=got.ids.device)
        return Retrieved(
            ids=got.ids.gather(1, pos),
            scores=got.scores.gather(1, pos.to(got.scores.device)),
            heads=[[h[j] for j in p] for h, p in zip(got.heads, positions)],
            candidates=[[c[j] for j in p] for c, p in zip(got.candidates, positions)],
            excluded=got.excluded,
        )

    def batch(self, queries: QuerySet, idx: list[int], gold: str = "paper"):
        """Gold scores ``r [B, K]`` of kind ``gold`` (``retriever_loss.gold_scores``; the paper's:
        the reader's gold log-likelihoods), candidate embeddings ``e [B, K, D]``, the B images;
        :attr:`last_reader_right` ``[B, K]`` whether the reader's prediction for each pair is right."""
        images = queries.images(idx)
        got = self.candidates(images, [queries.samples[i] for i in idx])
        rows = self._rows(queries, idx, images, got)
        labels, head = queries.labels[idx], self.pairs.scorer.head
        paper = gold_scores(rows, labels, "paper", head)
        self.last_reader_right = reader_right(rows, paper)
        r = paper if gold == "paper" else gold_scores(rows, labels, gold, head)
        return r, self.retrieval.embeddings(self.config.head, got.ids), images

    def train_mode(self, on: bool) -> None:
        """Train mode for the learned encoder only; the mixing anchor and candidate encoder stay in eval."""
        self.encoder.train(on)
        self.encoder.frozen.eval()
        self.candidate_encoder.eval()

    def query_embeddings(self, images: list) -> torch.Tensor:
        """``q̃ [B, D]``: the learned encoder mixed with the anchor (``QueryEncoder``), with grad."""
        return self.encoder(images)

    def fused_hits(self, queries: QuerySet, idx: list[int], images: list, with_partner: bool = False) -> int:
        """How many of the queries ``idx`` are answered right by the head's top ``select_k`` under
        the trained (mixed) query embedding — with the partner head's top k when ``with_partner`` —
        fused by the paper rule (``softmax(s)``, tau 1)."""
        cfg = self.config
        other = "image" if cfg.head == "text" else "text"
        k = {cfg.head: cfg.select_k, other: 0}
        mine = self.query_embeddings(images)
        q: torch.Tensor | dict[str, torch.Tensor] = mine
        if with_partner:
            if self.partner is None:
                raise ValueError("with_partner: expected a HeadModel built with a partner, got none")
            k[other] = self.partner.k
            q = {cfg.head: mine, other: self.partner.embed(images)}
        got = self.retrieval.search(q, k_text=k["text"], k_image=k["image"], queries=[queries.samples[i] for i in idx])
        if not with_partner:
            self.last_head_ids = got.ids.tolist()
        rows = self._rows(queries, idx, images, got)
        gold = queries.labels[idx]
        if gold.dim() == 2:  # multi-label: the fused label marginals, thresholded; right when the set is
            from ..infer.fusion import decide

            marginals = self.pairs.scorer.head.marginals(rows)
            chosen = decide(ops.fuse_candidates(marginals, got.scores.to(rows), 1.0), multilabel=True)
            return sum(frozenset(c) == frozenset(torch.nonzero(g).flatten().tolist()) for c, g in zip(chosen, gold))
        fused = ops.fuse_candidates(rows, got.scores.to(rows), 1.0)
        return int((fused.argmax(-1).cpu() == gold).sum())


@torch.no_grad()
def evaluate_retriever(heads: HeadModel, queries: QuerySet) -> dict:
    """KL (paper target, config temperatures), top-1 agreement, the head-only fused accuracy and,
    with a partner, the system accuracy (``fused_hits``), averaged over the queries; the distinct
    index records the head's top ``select_k`` holds over all the queries and per gold class
    (:mod:`.retriever_diagnostics`)."""
    cfg = heads.config
    heads.train_mode(False)
    kl_sum, agree_sum, hits, system_hits = 0.0, 0, 0, 0
    retrieved: list[list[int]] = []
    for idx in epoch_batches(list(range(len(queries))), cfg.batch_size):
        r, e, images = heads.batch(queries, idx)
        s = retriever_scores(heads.query_embeddings(images), e)
        kl_sum += float(ops.retrieval_kl_loss(s, r, cfg.tau_retriever, cfg.tau_reader, reduction="sum"))
        agree_sum += int(top1_agreement(s, r).sum())
        hits += heads.fused_hits(queries, idx, images)
        retrieved += heads.last_head_ids
        if heads.partner is not None:
            system_hits += heads.fused_hits(queries, idx, images, with_partner=True)
    n = len(queries)
    out: dict = {"kl": kl_sum / n, "agreement": agree_sum / n, "accuracy": hits / n, "queries": n}
    out["distinct_records"] = distinct_records(retrieved)
    out["per_class_distinct"] = per_class_distinct(retrieved, queries.labels)
    if heads.partner is not None:
        out["system_accuracy"] = system_hits / n
    return out
