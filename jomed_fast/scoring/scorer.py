"""``CandidateScorer``: the reader's class log-probabilities for every (query, candidate) pair.

``scorer.score(query_images, questions, candidates) -> [B, K, C]`` runs six stages per call, each a
method that takes what the one before produced (``batch.Packing``, ``batch.SuffixRows``,
``Prefixes``) and can be run alone:

1. **prompts** (``split_prompts``; ``jomed_fast.prompts.split_query``): each query's K prompts in
   the layout, tokenized and split at their shared token prefix;
2. **pack** (``batch.pack``): every distinct image (by object identity) preprocessed once
   (``images.ImageTable``); placeholders expanded; the C++ packer
   (``jomed_fast.packing.pack_candidates_batch``) builds the right-padded suffix batch, its masks
   and its 1-D / M-RoPE positions continuing each prefix; the distinct prefixes;
3. **images** (``encode_images``, NVTX ``jomed.vision``): the vision tower + projector once per
   distinct image — in ``shared_query`` the query image sits in the prefix, in ``paper`` its
   features are scattered into each of its K suffixes; candidate images are encoded once each;
4. **prefix KV** (``run_prefixes``, ``jomed.prefix``): every distinct prefix runs once (``paper``:
   the chat template's system part, identical for all queries, so once per call;
   ``shared_query``: system + query image + question, once per query) and keeps its KV-cache;
5. **chunk plan** (``chunk_plan``): the B·K candidate rows sorted by length and cut into the plan
   of least cost ``Σ_chunks rows · padded length + F · forwards`` (token slots; F the fixed cost
   of a forward, ``RowCost.forward_overhead``), every chunk within the memory budget at its own
   padded length (``memory_budget.plan_chunks``: the model, the dynamic programme and why F is what it
   is; ``ScoreStats.chunk_shapes`` records the forwards);
6. **score a chunk** (``score_chunk``, ``jomed.suffix`` then ``jomed.head``): the chunk padded to
   its own longest row, each row's suffix (and, for multi-token classes, the class trie)
   attending to its prefix's cache (see ``attention``) with explicit positions — M-RoPE
   ``position_ids`` are always passed, so the model's cached ``rope_deltas`` are never read; then
   ``ops.head_class_log_softmax`` on the hidden state at each prompt's last token (and at the trie
   nodes), no full-vocabulary logits. The chunks' scores are scattered back to ``[B, K]`` order.

Gradients: only when they are asked for — autograd is on (the caller is not under
``torch.no_grad``) *and* the reader has trainable parameters (a LoRA adapter; ``load_reader``
freezes everything else) — are the scores differentiable w.r.t. them (through suffix, prefix and, if
it trains, the vision tower); with several chunks each chunk is gradient-checkpointed
(``checkpoint="auto"``) so training memory stays within the budget too. Otherwise everything runs
under ``torch.no_grad`` and the scores carry no graph. (Not ``inference_mode``: its tensors cannot
be saved for a backward, and the scores are a loss's targets in stage 2.)

The family's facts (image tokens, placeholders, 1-D or M-RoPE positions, the vision tower's
dimensions) come from the reader (``readers.families``, ``readers.image_formats``); nothing here
branches on the family.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from transformers import DynamicCache

from .. import prompts as _prompts
from .._profiling import stage
from ..tasks.verbalizer import build_verbalizer
from .attention import Prefixes, PrefixKV, check_attention, prefix_mask, suffix_mask, to_model_mask
from .batch import Packing, SuffixRows, pack
from .class_head import ClassHead
from .images import ImageTable
from .inputs import normalize_inputs
from .label_set_head import DEFAULT_MAX_LABELS, LabelSetHead
from .memory_budget import RowCost, check_budget, check_overhead, default_budget, plan_chunks
from .score_stats import ScoreStats

CHECKPOINT_MODES = ("auto", True, False)


class CandidateScorer:
    """Scores (query, candidate) pairs with a reader: ``[B, K, C]`` class log-probabilities.

    Args:
        reader: a ``jomed_fast.readers.Reader`` (``load_reader``), any quantization, with or
            without LoRA; attention implementation ``sdpa`` (default) or ``eager``.
        task: a ``jomed_fast.tasks.Task`` or its registered name; it must have a label set.
        layout: ``"paper"`` (default: the paper's prompt, the whole pipeline's default) or
            ``"shared_query"`` (the query first, its prefix KV shared by the K candidates; another prompt).
        memory_budget: bytes one chunk may use (see ``scoring.memory_budget``); None: a fraction of the
            free memory, read at each call.
        class_mode: ``"auto"`` (``first_token`` when every class is one token, else ``sequence``),
            ``"first_token"`` or ``"sequence"``; see ``scoring.class_head``.
        normalize: in ``sequence`` mode, return ``log_softmax`` over the classes of the
            restricted teacher-forced sums (default) rather than the sums themselves.
        max_labels: multi-label tasks only: the largest answer set scored (``scoring.label_set_head``:
            every set of at most this many labels is an answer; None: every set). Multi-label
            tasks are always scored by that head (``class_mode`` must stay ``"auto"``).
        end_token: the end-of-answer token closing multi-token class sequences (default the
            tokenizer's eos: ``<|im_end|>`` / ``</s>``).
        checkpoint: gradient-checkpoint each suffix chunk when training (``"auto"``: when there
            is more than one chunk), True / False to force.
        forward_overhead: the fixed cost of one suffix forward in token slots for the chunk plan
            (``scoring.memory_budget``, "Length-aware chunking"); None: ``RowCost.forward_overhead()``
            from the reader's dimensions; ``float("inf")``: the fewest forwards the budget allows.
    """

    def __init__(
        self,
        reader,
        task,
        layout: str = "paper",
        *,
        memory_budget: int | None = None,
        class_mode: str = "auto",
        normalize: bool = True,
        end_token: Any = None,
        checkpoint: Any = "auto",
        forward_overhead: float | None = None,
        max_labels: int | None = DEFAULT_MAX_LABELS,
    ):
        from ..tasks import Task, get_task

        for attr in ("processor", "hf_model", "decoder", "lm_head_weight", "family"):
            if not hasattr(reader, attr):
                raise TypeError(
                    f"reader: expected a jomed_fast.readers.Reader (load_reader), got {type(reader).__name__}"
                )
        if isinstance(task, str):
            task = get_task(task)
        if not isinstance(task, Task):
            raise TypeError(f"task: expected a jomed_fast.tasks.Task or a task name, got {type(task).__name__}")
        if not task.labels:
            raise ValueError(f"task: {task.name!r} has no label set to score; attach one with task.with_labels(...)")
        if layout not in _prompts.LAYOUTS:
            raise ValueError(f"layout: expected one of {_prompts.LAYOUTS}, got {layout!r}")
        if checkpoint not in CHECKPOINT_MODES:
            raise ValueError(f"checkpoint: expected one of {CHECKPOINT_MODES}, got {checkpoint!r}")
        self.reader = reader
        self.task = task
        self.layout = layout
        self.memory_budget = check_budget(memory_budget)
        self.checkpoint = checkpoint
        self.verbalizer = build_verbalizer(task, reader.tokenizer, end_token=end_token)
        self.head: ClassHead | LabelSetHead
        if task.is_multilabel:
            if class_mode != "auto":
                raise ValueError(
                    f"class_mode: a multi-label task is scored as label sets (scoring.label_set_head); "
                    f"expected 'auto', got {class_mode!r}"
                )
            self.head = LabelSetHead(self.verbalizer, max_labels).to(reader.device)
        else:
            self.head = ClassHead(self.verbalizer, class_mode, normalize).to(reader.device)
        self.attention = check_attention(reader)
        self.cost = RowCost(reader)
        given = check_overhead(forward_overhead)
        self.forward_overhead = self.cost.forward_overhead() if given is None else given
        self.vision_dims = reader.vision_dims
        self.last_stats: ScoreStats | None = None

    @property
    def num_classes(self) -> int:
        return self.verbalizer.num_classes

    @property
    def labels(self) -> tuple[str, ...]:
        return self.task.labels

    def __repr__(self) -> str:
        return (
            f"CandidateScorer(family={self.reader.family!r}, task={self.task.name!r}, layout={self.layout!r}, "
            f"class_mode={self.head.mode!r}, C={self.num_classes})"
        )

    # ------------------------------------------------------------------------------------ API
    def score(self, query_images, questions, candidates, *, label_sets: bool = False) -> torch.Tensor:
        """Class log-probabilities ``[B, K, C]`` (float32, on the reader's device).

        Args:
            query_images: B query images (PIL images or ``[H, W(, 3)]`` arrays; None for a query
                without an image), as a list or a ``[B, H, W(, 3)]`` array.
            questions: None (the task's fixed question for every query), or B entries (str, or
                None for the fixed question); required for tasks without a fixed question (VQA).
            candidates: B lists of the same K ≥ 1 candidates: ``Candidate(image, text)``, dicts or
                index records with ``image`` / ``text``, ``(image, text)`` tuples, or None (the
                prompt without retrieved context). A candidate image may be None (caption only).

        Entry ``[b, k, c]`` is ``log p(class c | prompt(query b, candidate k))``: the class-restricted
        softmax at the answer position (``first_token``), or the normalised restricted
        teacher-forced log-likelihood of the class's tokens (``sequence``). For a multi-label task
        it is ``log p(c ∈ S | prompt)``, the label's marginal in the reader's restricted answer set
        (``scoring.label_set_head``); with ``label_sets=True`` (multi-label only) the output is
        ``[B, K, |S|]`` instead: ``log p(S | prompt)`` for every answer set ``S`` of ``head.sets``.
        """
        if label_sets and not isinstance(self.head, LabelSetHead):
            raise ValueError(f"label_sets: only a multi-label task has label sets, task {self.task.name!r} is not one")
        images, qs, cands, B, K = normalize_inputs(self.task, query_images, questions, candidates)
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.reader.model.parameters())
        with contextlib.nullcontext() if grad else torch.no_grad():
            return self._score(images, qs, cands, B, K, grad, label_sets)

    def _score(self, images, qs, cands, B, K, grad: bool, label_sets: bool = False) -> torch.Tensor:
        budget = self.memory_budget or default_budget(self.reader.device)
        stats = ScoreStats(
            layout=self.layout,
            queries=B,
            candidates=K,
            class_mode=self.head.mode,
            memory_budget=budget,
            forward_overhead=self.forward_overhead,
        )
        packing = pack(self.reader.processor, self.split_prompts(images, qs, cands), images)
        self.encode_images(packing.table, budget, grad)
        prefixes = self.run_prefixes(packing, budget, grad)
        rows = SuffixRows.from_packing(packing)
        chunks = self.chunk_plan(rows.lengths, prefixes.length, budget, grad)
        self._record(stats, packing, prefixes, rows, chunks, grad)
        use_ckpt = grad and (self.checkpoint is True or (self.checkpoint == "auto" and len(chunks) > 1))
        outs = []
        for chunk in chunks:
            if use_ckpt:
                from torch.utils.checkpoint import checkpoint

                outs.append(
                    checkpoint(self.score_chunk, chunk, rows, prefixes, packing.table, label_sets, use_reentrant=False)
                )
            else:
                outs.append(self.score_chunk(chunk, rows, prefixes, packing.table, label_sets))
        self.last_stats = stats
        ran = torch.cat(chunks)  # row index of each output, in run order
        inverse = torch.empty_like(ran)
        inverse[ran] = torch.arange(len(ran))
        return torch.cat(outs).index_select(0, inverse.to(self.reader.device)).view(B, K, -1)

    # ------------------------------------------------------------------------------------ stages
    def split_prompts(self, images, qs, cands) -> list[_prompts.QueryPrompts]:
        """Stage 1: each query's K prompts, tokenized and split at their shared prefix."""
        return [
            _prompts.split_query(
                self.reader.processor,
                self.layout,
                self.task,
                images[b],
                qs[b],
                cands[b],
                name=f"candidates[{b}]",
                question_name=f"questions[{b}]",
            )
            for b in range(len(images))
        ]

    def encode_images(self, table: ImageTable, budget: int, grad: bool) -> torch.Tensor:
        """Stage 3: every image of ``table`` through the vision tower + projector, in chunks of
        patches within ``budget`` (``RowCost.vision_patches``); without autograd unless the
        tower trains. Returns (and sets) ``table.features``."""
        vision_trains = grad and any(p.requires_grad for p in self.reader.vision_parameters())
        with contextlib.nullcontext() if vision_trains else torch.no_grad():
            return table.encode(self.reader, self.cost.vision_patches(budget, *self.vision_dims))

    def run_prefixes(self, packing: Packing, budget: int, grad: bool) -> Prefixes:
        """Stage 4: every distinct prefix once (after ``encode_images``), as many per forward as
        ``budget`` allows; their KV-cache."""
        Pm, first = packing.prefix_length, packing.first_query
        if not Pm:
            return Prefixes(None, packing.prefix_of, 0)
        per_chunk = self.cost.rows(budget, Pm, 0, grad)
        parts = []
        for u0 in range(0, len(first), per_chunk):
            with stage("jomed.prefix"):
                parts.append(self._prefix_forward(packing, first[u0 : u0 + per_chunk]))
        return Prefixes(PrefixKV.concat(parts), packing.prefix_of, Pm, min(per_chunk, len(first)))

    def _prefix_forward(self, packing: Packing, queries: list[int]) -> PrefixKV:
        """The prefixes of ``queries`` (one row each) through the decoder: their KV-cache."""
        reader, dev, Pm = self.reader, self.reader.device, packing.prefix_length
        ids = packing.batch.prefix_input_ids[queries]
        x = packing.table.embed(reader, ids, [u for b in queries for u in packing.prefix_uids[b]])
        mask = to_model_mask(prefix_mask(packing.batch.prefix_lengths[queries].to(dev), Pm), self.attention, x.dtype)
        out = reader.decoder(
            inputs_embeds=x,
            attention_mask=mask,
            position_ids=packing.prefix_positions(queries, dev),
            cache=DynamicCache(config=reader.decoder.config),
            use_cache=True,
        )
        return PrefixKV.from_cache(out.cache)

    def chunk_plan(self, suffix_lengths, prefix_length: int, budget: int, grad: bool) -> list[torch.Tensor]:
        """Stage 5: R rows of ``suffix_lengths[r] ≥ 1`` suffix tokens, each followed by the class
        trie's N nodes and attending to ``prefix_length`` cached slots, cut into forwards: a chunk
        padded to ℓ (nodes included) holds at most ``cost.rows(budget, ℓ, prefix_length, grad)``
        rows, the plan of least cost (``memory_budget.plan_chunks``). Row indices (long), in run order."""
        lengths = (torch.as_tensor(suffix_lengths, dtype=torch.long) + self.head.num_nodes).tolist()
        plan = plan_chunks(
            lengths, lambda length: self.cost.rows(budget, length, prefix_length, grad), self.forward_overhead
        )
        return [torch.tensor(c, dtype=torch.long) for c in plan]

    def score_chunk(
        self, chunk: torch.Tensor, rows: SuffixRows, prefixes: Prefixes, table: ImageTable, label_sets: bool = False
    ) -> torch.Tensor:
        """Stage 6: rows ``chunk`` (long) of ``rows``, padded to their longest, the trie nodes
        appended, through the decoder over their prefixes' cache; the class scores ``[len(chunk), C]``
        (``label_sets``: the answer sets' ``[len(chunk), |S|]``)."""
        reader, head, dev = self.reader, self.head, self.reader.device
        N, Rc = head.num_nodes, len(chunk)
        n = rows.lengths[chunk]
        Lc, n_dev = int(n.max()), n.to(dev)
        with stage("jomed.suffix"):
            ids = rows.ids[chunk, :Lc]
            if N:
                ids = torch.cat([ids, head.node_tokens.cpu()[None].expand(Rc, N)], dim=1)
            x = table.embed(reader, ids, [u for r in chunk.tolist() for u in rows.image_uids[r]])
            allowed = suffix_mask(rows.prefix_lengths[chunk].to(dev), prefixes.length, n_dev, Lc, head.node_ancestors)
            cache = prefixes.cache_for(rows.query[chunk])
            out = reader.decoder(
                inputs_embeds=x,
                attention_mask=to_model_mask(allowed, self.attention, x.dtype),
                position_ids=rows.chunk_positions(chunk, Lc, head.node_depths, dev),
                cache=cache,
                use_cache=cache is not None,
            ).last_hidden_state
            h_ans = out[torch.arange(Rc, device=dev), n_dev - 1]
            h_nodes = out[:, Lc:] if N else None
        with stage("jomed.head"):
            if label_sets and isinstance(head, LabelSetHead):
                return head.set_log_probs(h_ans, h_nodes, reader.lm_head_weight())
            return head.scores(h_ans, h_nodes, reader.lm_head_weight())

    # ------------------------------------------------------------------------------------ stats
    def _record(
        self,
        stats: ScoreStats,
        packing: Packing,
        prefixes: Prefixes,
        rows: SuffixRows,
        chunks: list[torch.Tensor],
        grad: bool,
    ) -> None:
        table, Pm, N = packing.table, packing.prefix_length, self.head.num_nodes
        stats.vision_images = len(table)
        stats.vision_patches = sum(table.patches(u) for u in range(len(table)))
        stats.image_tokens = table.total_features
        U = len(packing.first_query)
        stats.prefix_rows = U if Pm else 0
        stats.prefix_tokens = int(packing.batch.prefix_lengths[packing.first_query].sum()) if Pm else 0
        stats.prefix_slots = U * Pm
        stats.prefix_rows_per_chunk = prefixes.rows_per_chunk
        R = len(rows.lengths)
        stats.row_bytes = self.cost.row_bytes(rows.ids.shape[1] + N, Pm, grad)
        stats.suffix_tokens = int(rows.lengths.sum())
        stats.class_tokens = R * N
        stats.chunks = len(chunks)
        for chunk in chunks:
            padded = int(rows.lengths[chunk].max()) + N
            stats.chunk_shapes.append((len(chunk), padded))
            stats.suffix_slots += len(chunk) * padded
            stats.rows_per_chunk = max(stats.rows_per_chunk, len(chunk))
            stats.shared_prefix_chunks += int(prefixes.shared(rows.query[chunk]))
