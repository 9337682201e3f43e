"""``CandidateScorer``: the reader's class log-probabilities for every (query, candidate) pair.

``scorer.score(query_images, questions, candidates) -> [B, K, C]`` runs, per call:

1. **prompts** (``jomed_fast.prompts.split_query``): each query's K prompts in the layout, tokenized
   and split at their shared token prefix;
2. **images** (``images.ImageTable``): every distinct image (by object identity) preprocessed once;
   placeholders expanded; the C++ packer (``jomed_fast.packing.pack_candidates_batch``) builds the
   right-padded suffix batch, its masks and its 1-D / M-RoPE positions continuing each prefix;
3. **vision** (NVTX ``jomed.vision``): the vision tower + projector once per distinct image — in
   ``shared_query`` the query image sits in the prefix, in ``paper`` its features are scattered
   into each of its K suffixes; candidate images are encoded once each;
4. **prefix** (``jomed.prefix``): every distinct prefix runs once (``paper``: the chat template's
   system part, identical for all queries, so once per call; ``shared_query``: system + query image
   + question, once per query) and keeps its KV-cache;
5. **suffix** (``jomed.suffix``): the B·K candidate rows in length-aware chunks: the rows sorted by
   length and cut into the plan of least cost ``Σ_chunks rows · padded length + F · forwards``
   (token slots; F the fixed cost of a forward, ``RowCost.forward_overhead``), every chunk within
   the memory budget at its own padded length (``memory.plan_chunks``: the model, the dynamic
   programme and why F is what it is); each chunk padded to its own longest row, the scores
   scattered back to ``[B, K]`` order (``ScoreStats.chunk_shapes`` records the forwards). Each
   row's suffix (and, for multi-token classes, the class trie) attending to its prefix's cache
   (see ``attention``) with explicit positions — M-RoPE ``position_ids`` are always passed, so
   the model's cached ``rope_deltas`` are never read;
6. **head** (``jomed.head``): ``ops.head_class_log_softmax`` on the hidden state at each prompt's
   last token (and at the trie nodes); no full-vocabulary logits.

Gradients: when autograd is on and the reader has trainable parameters (LoRA), the scores are
differentiable w.r.t. them (through suffix, prefix and, if it trains, the vision tower); with
several chunks each chunk is gradient-checkpointed (``checkpoint="auto"``) so training memory stays
within the budget too. Otherwise everything runs under ``torch.no_grad``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
from transformers import DynamicCache

from .. import prompts as _prompts
from ..packing import QueryCandidates, pack_candidates_batch
from .._profiling import stage
from .attention import (
    PrefixKV,
    check_attention,
    prefix_mask,
    suffix_mask,
    to_model_mask,
)
from .heads import ClassHead
from .images import ImageTable
from .inputs import normalize_inputs
from .memory import RowCost, check_budget, check_overhead, default_budget, plan_chunks

CHECKPOINT_MODES = ("auto", True, False)


@dataclasses.dataclass
class ScoreStats:
    """What the last ``score`` call ran (for benchmarks and the FLOP model)."""

    layout: str
    queries: int
    candidates: int
    class_mode: str
    vision_images: int = 0  # distinct images through the vision tower
    vision_patches: int = 0
    image_tokens: int = 0  # image features produced (placeholder tokens filled by them)
    prefix_rows: int = 0  # distinct prefixes run
    prefix_tokens: int = 0  # real prefix tokens run through the LLM
    prefix_slots: int = 0  # including padding
    suffix_tokens: int = 0  # real suffix tokens (all rows)
    class_tokens: int = 0  # trie-node tokens (all rows)
    suffix_slots: int = 0  # suffix + node slots computed, including padding
    chunks: int = 0  # suffix forwards
    rows_per_chunk: int = 0  # rows of the largest suffix chunk
    chunk_shapes: list = dataclasses.field(default_factory=list)  # (rows, padded length incl. nodes) per chunk
    prefix_rows_per_chunk: int = 0
    row_bytes: int = 0  # one suffix row at the longest length
    memory_budget: int = 0
    forward_overhead: float = 0.0  # the cost model's fixed cost of a suffix forward, in token slots
    shared_prefix_chunks: int = 0  # chunks whose rows all read one prefix (expanded cache view)

    @property
    def llm_tokens(self) -> int:
        """Real tokens run through the language model (prefix + suffix + class tokens)."""
        return self.prefix_tokens + self.suffix_tokens + self.class_tokens


class CandidateScorer:
    """Scores (query, candidate) pairs with a reader: ``[B, K, C]`` class log-probabilities.

    Args:
        reader: a ``jomed_fast.readers.Reader`` (``load_reader``), any quantization, with or
            without LoRA; attention implementation ``sdpa`` (default) or ``eager``.
        task: a ``jomed_fast.tasks.Task`` or its registered name; it must have a label set.
        layout: ``"shared_query"`` (default; prefix KV shared by the K candidates) or ``"paper"``.
        memory_budget: bytes one chunk may use (see ``scoring.memory``); None: a fraction of the
            free memory, read at each call.
        class_mode: ``"auto"`` (``first_token`` when every class is one token, else ``sequence``),
            ``"first_token"`` or ``"sequence"``; see ``scoring.heads``.
        normalize: in ``sequence`` mode, return ``log_softmax`` over the classes of the
            restricted teacher-forced sums (default) rather than the sums themselves.
        end_token: the end-of-answer token closing multi-token class sequences (default the
            tokenizer's eos: ``<|im_end|>`` / ``</s>``).
        checkpoint: gradient-checkpoint each suffix chunk when training (``"auto"``: when there
            is more than one chunk), True / False to force.
        forward_overhead: the fixed cost of one suffix forward in token slots for the chunk plan
            (``scoring.memory``, "Length-aware chunking"); None: ``RowCost.forward_overhead()``
            from the reader's dimensions; ``float("inf")``: the fewest forwards the budget allows.
    """

    def __init__(self, reader, task, layout: str = "shared_query", *, memory_budget: int | None = None,
                 class_mode: str = "auto", normalize: bool = True, end_token: Any = None,
                 checkpoint: Any = "auto", forward_overhead: float | None = None):
        from ..tasks import Task, get_task

        for attr in ("processor", "hf_model", "decoder", "lm_head_weight", "family"):
            if not hasattr(reader, attr):
                raise TypeError(f"reader: expected a jomed_fast.readers.Reader (load_reader), got {type(reader).__name__}")
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
        self.verbalizer = task.verbalizer(reader.tokenizer, end_token=end_token)
        self.head = ClassHead(self.verbalizer, class_mode, normalize).to(reader.device)
        self.attention = check_attention(reader)
        self.cost = RowCost(reader)
        given = check_overhead(forward_overhead)
        self.forward_overhead = self.cost.forward_overhead() if given is None else given
        self.mrope = reader.family == "qwen2_vl"
        self.last_stats: ScoreStats | None = None

    @property
    def num_classes(self) -> int:
        return self.verbalizer.num_classes

    @property
    def labels(self) -> tuple[str, ...]:
        return self.task.labels

    def __repr__(self) -> str:
        return (f"CandidateScorer(family={self.reader.family!r}, task={self.task.name!r}, layout={self.layout!r}, "
                f"class_mode={self.head.mode!r}, C={self.num_classes})")

    # ------------------------------------------------------------------------------------ API
    def score(self, query_images, questions, candidates) -> torch.Tensor:
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
        teacher-forced log-likelihood of the class's tokens (``sequence``).
        """
        images, qs, cands, B, K = normalize_inputs(self.task, query_images, questions, candidates)
        trainable = any(p.requires_grad for p in self.reader.model.parameters())
        grad = torch.is_grad_enabled() and trainable
        with contextlib.nullcontext() if grad else torch.no_grad():
            return self._score(images, qs, cands, B, K, grad)

    # ------------------------------------------------------------------------------------ work
    def _score(self, images, qs, cands, B, K, grad: bool) -> torch.Tensor:
        reader, proc = self.reader, self.reader.processor
        dev = reader.device
        budget = self.memory_budget or default_budget(dev)
        stats = ScoreStats(layout=self.layout, queries=B, candidates=K, class_mode=self.head.mode,
                           memory_budget=budget, forward_overhead=self.forward_overhead)

        # 1. prompts -------------------------------------------------------------------------
        splits = [
            _prompts.split_query(proc, self.layout, self.task, images[b], qs[b], cands[b],
                                 name=f"candidates[{b}]", question_name=f"questions[{b}]")
            for b in range(B)
        ]

        # 2. images, placeholders, packing -----------------------------------------------------
        table = ImageTable(proc)

        def uid(img, b, k=None):
            if img is images[b]:
                return table.add(img, f"query_images[{b}]")
            return table.add(img, f"candidates[{b}][{k}].image")

        prefix_uids = [[uid(img, b) for img in s.prefix_images] for b, s in enumerate(splits)]
        row_uids = [[[uid(img, b, k) for img in imgs] for k, imgs in enumerate(s.segment_images)]
                    for b, s in enumerate(splits)]
        table.preprocess()
        queries = [self._query(table, s, prefix_uids[b], row_uids[b]) for b, s in enumerate(splits)]
        packed = pack_candidates_batch(queries, pad_token_id=proc.pad_token_id,
                                       spatial_merge_size=proc.merge_size, mrope=self.mrope)

        # 3. vision ----------------------------------------------------------------------------
        vision_trains = grad and any(p.requires_grad for p in self._vision_parameters())
        with contextlib.nullcontext() if vision_trains else torch.no_grad():
            feats = table.encode(reader, self._vision_patch_budget(budget))
        stats.vision_images = len(table)
        stats.vision_patches = sum(table.patches(u) for u in range(len(table)))
        stats.image_tokens = table.total_features

        def feature_index(uids: list[int]) -> list[int]:
            out: list[int] = []
            for u in uids:
                off = table.feature_offsets[u]
                out.extend(range(off, off + table.num_features[u]))
            return out

        embed = reader.hf_model.get_input_embeddings()
        image_id = proc.image_token_id
        Pm = packed.prefix_input_ids.shape[1]
        L = packed.input_ids.shape[2]
        N = self.head.num_nodes

        def embed_with_images(ids: torch.Tensor, index: list[int]) -> torch.Tensor:
            x = embed(ids.to(dev))
            if index:
                mask = (ids == image_id).to(dev)[..., None]
                src = feats.index_select(0, torch.tensor(index, dtype=torch.long, device=dev))
                x = x.masked_scatter(mask, src.to(x.dtype))
            return x

        # 4. prefix ----------------------------------------------------------------------------
        keys: dict[tuple, int] = {}
        pu = []
        for b, s in enumerate(splits):
            key = (tuple(s.prefix_ids), tuple(prefix_uids[b]))
            pu.append(keys.setdefault(key, len(keys)))
        first_b = [pu.index(u) for u in range(len(keys))]
        U = len(first_b)
        pu_t = torch.tensor(pu, dtype=torch.long)
        prefix_lengths = packed.prefix_lengths  # [B]
        prefix_kv: PrefixKV | None = None
        stats.prefix_rows = U if Pm else 0
        stats.prefix_tokens = int(prefix_lengths[first_b].sum()) if Pm else 0
        stats.prefix_slots = U * Pm
        if Pm:
            per_chunk = self.cost.rows(budget, Pm, 0, grad)
            stats.prefix_rows_per_chunk = min(per_chunk, U)
            kv_parts = []
            for u0 in range(0, U, per_chunk):
                us = list(range(u0, min(U, u0 + per_chunk)))
                bs = [first_b[u] for u in us]
                with stage("jomed.prefix"):
                    ids = packed.prefix_input_ids[bs]
                    x = embed_with_images(ids, [i for b in bs for i in feature_index(prefix_uids[b])])
                    lengths = prefix_lengths[bs].to(dev)
                    if self.mrope:
                        pos = packed.prefix_mrope_position_ids[:, bs].to(dev)
                    else:
                        pos = torch.arange(Pm, device=dev)[None].expand(len(bs), Pm)
                    mask = to_model_mask(prefix_mask(lengths, Pm), self.attention, x.dtype)
                    out = reader.decoder(inputs_embeds=x, attention_mask=mask, position_ids=pos,
                                         cache=DynamicCache(config=reader.decoder.config), use_cache=True)
                    kv_parts.append(PrefixKV.from_cache(out.cache))
            prefix_kv = PrefixKV.concat(kv_parts)

        # 5. suffix + 6. head --------------------------------------------------------------------
        R = B * K
        n_all = packed.suffix_lengths.reshape(R)
        if int(n_all.min()) < 1:  # split_query never leaves a segment empty (the answer cue follows)
            raise RuntimeError("layout: a candidate's prompt segment is empty; the answer position is undefined")
        row_b = torch.arange(R) // K
        ids_all = packed.input_ids.reshape(R, L)
        pos_all = packed.position_ids.reshape(R, L)
        mrope_all = packed.mrope_position_ids.reshape(3, R, L) if self.mrope else None
        deltas_all = packed.rope_deltas.reshape(R) if self.mrope else None
        stats.row_bytes = self.cost.row_bytes(L + N, Pm, grad)
        stats.suffix_tokens = int(n_all.sum())
        stats.class_tokens = R * N
        weight = reader.lm_head_weight()
        head = self.head
        depths = head.node_depths.to(dev)

        def run_chunk(rows: torch.Tensor) -> torch.Tensor:
            n = n_all[rows]
            Rc = len(rows)
            Lc = int(n.max())
            bs = row_b[rows]
            P_rows = prefix_lengths[bs]
            n_dev = n.to(dev)
            with stage("jomed.suffix"):
                ids = ids_all[rows, :Lc]
                if N:
                    ids = torch.cat([ids, head.node_tokens.cpu()[None].expand(Rc, N)], dim=1)
                index = [i for r in rows.tolist() for i in feature_index(row_uids[r // K][r % K])]
                x = embed_with_images(ids, index)
                node_pos = (P_rows + n).to(dev)[:, None] + depths[None] - 1  # [Rc, N]
                if self.mrope:  # text after the prompt: HF's cache position + rope delta
                    node_pos = node_pos + deltas_all[rows].to(dev)[:, None]
                    pos = torch.cat([mrope_all[:, rows, :Lc].to(dev), node_pos[None].expand(3, Rc, N)], dim=2)
                else:
                    pos = torch.cat([pos_all[rows, :Lc].to(dev), node_pos], dim=1)
                allowed = suffix_mask(P_rows.to(dev), Pm, n_dev, Lc, head.node_ancestors)
                mask = to_model_mask(allowed, self.attention, x.dtype)
                cache = prefix_kv.cache_for(pu_t[bs]) if prefix_kv is not None else None
                out = reader.decoder(inputs_embeds=x, attention_mask=mask, position_ids=pos,
                                     cache=cache, use_cache=cache is not None).last_hidden_state
                h_ans = out[torch.arange(Rc, device=dev), n_dev - 1]
                h_nodes = out[:, Lc:] if N else None
            with stage("jomed.head"):
                return head.scores(h_ans, h_nodes, weight)

        # the chunk plan: rows by length, cut by the cost model within the budget (memory.plan_chunks)
        plan = plan_chunks((n_all + N).tolist(), lambda length: self.cost.rows(budget, length, Pm, grad),
                           self.forward_overhead)
        chunks = [torch.tensor(c, dtype=torch.long) for c in plan]
        stats.chunks = len(chunks)
        use_ckpt = grad and (self.checkpoint is True or (self.checkpoint == "auto" and len(chunks) > 1))
        outs = []
        for rows in chunks:
            bs = row_b[rows]
            padded = int(n_all[rows].max()) + N
            stats.chunk_shapes.append((len(rows), padded))
            stats.suffix_slots += len(rows) * padded
            stats.rows_per_chunk = max(stats.rows_per_chunk, len(rows))
            stats.shared_prefix_chunks += int(prefix_kv is not None and bool((pu_t[bs] == pu_t[bs[0]]).all()))
            if use_ckpt:
                from torch.utils.checkpoint import checkpoint

                outs.append(checkpoint(run_chunk, rows, use_reentrant=False))
            else:
                outs.append(run_chunk(rows))
        self.last_stats = stats
        ran = torch.cat(chunks)  # row index of each output, in run order
        inverse = torch.empty_like(ran)
        inverse[ran] = torch.arange(R)
        return torch.cat(outs).index_select(0, inverse.to(dev)).view(B, K, -1)

    # ------------------------------------------------------------------------------------ helpers
    def _query(self, table: ImageTable, split, prefix_uids: list[int], row_uids: list[list[int]]) -> QueryCandidates:
        """One query's ``QueryCandidates``: placeholders expanded, image spans and grids."""
        image_id = self.reader.processor.image_token_id

        def expand(ids: list[int], uids: list[int]):
            out: list[int] = []
            spans: list[tuple[int, int]] = []
            j = 0
            start = 0
            while True:
                try:
                    at = ids.index(image_id, start)
                except ValueError:
                    out.extend(ids[start:])
                    return out, spans
                out.extend(ids[start:at])
                ph = table.placeholders[uids[j]]
                spans.append((len(out), len(ph)))
                out.extend(ph)
                j += 1
                start = at + 1

        prefix, p_spans = expand(split.prefix_ids, prefix_uids)
        segs, c_spans, c_grids = [], [], []
        for k, (seg, uids) in enumerate(zip(split.segments, row_uids)):
            ids, spans = expand(seg, uids)
            segs.append(torch.tensor(ids, dtype=torch.long))
            c_spans.extend((k, s, n) for s, n in spans)
            if self.mrope:
                c_grids.extend(table.grids[u] for u in uids)
        lengths = torch.tensor([0] + [len(s) for s in segs], dtype=torch.long)
        mrope = self.mrope
        return QueryCandidates(
            prefix_ids=torch.tensor(prefix, dtype=torch.long),
            candidate_ids=torch.cat(segs) if segs else torch.empty(0, dtype=torch.long),
            candidate_offsets=torch.cumsum(lengths, 0),
            prefix_image_spans=torch.tensor(p_spans, dtype=torch.long).reshape(-1, 2),
            prefix_image_grid_thw=(torch.tensor([table.grids[u] for u in prefix_uids], dtype=torch.long)
                                   .reshape(-1, 3) if mrope else None),
            candidate_image_spans=torch.tensor(c_spans, dtype=torch.long).reshape(-1, 3),
            candidate_image_grid_thw=torch.tensor(c_grids, dtype=torch.long).reshape(-1, 3) if mrope else None,
        )

    def _vision_parameters(self):
        model = self.reader.hf_model.model
        for name in ("visual", "vision_tower", "multi_modal_projector"):
            module = getattr(model, name, None)
            if module is not None:
                yield from module.parameters()

    def _vision_patch_budget(self, budget: int) -> int:
        vc = self.reader.config.vision_config
        if self.mrope:
            hidden = int(vc.embed_dim)
            inter = int(hidden * getattr(vc, "mlp_ratio", 4))
            heads = int(vc.num_heads)
        else:
            hidden = int(vc.hidden_size)
            inter = int(vc.intermediate_size)
            heads = int(vc.num_attention_heads)
        return self.cost.vision_patches(budget, hidden, inter, heads)
