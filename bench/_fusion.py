"""The workload and the methods ``bench/fusion_throughput.py`` compares: how each runs, what it
computed, whether they agree, and the FLOP model of their work.

* :func:`make_workload`: B query images and B rows of K candidates from the synthetic task.
* :func:`load`: the reader (a checkpoint, or a tiny one built once into a cache keyed by the
  builder's version), frozen, in eval mode.
* :class:`ReferenceLoop`, :class:`HFBatched`: what users would otherwise run on the unmodified HF
  model; :class:`Jomed`: the toolkit's ``CandidateScorer``. Each is called as
  ``method(query_images, candidate_rows) -> [B, K, C]`` class log-probabilities.
* :func:`check_agreement`: the methods' scores against each other, before any speed is reported.
* :func:`counted_call`: a timed call and what it computed: real tokens into the language model
  and images into the vision tower (:class:`Counter`'s forward hooks for the HF methods, the
  toolkit's own ``ScoreStats``).
* :func:`prompt_shapes`, :func:`method_flops`, :func:`padding_factors`: the prompts' token and
  image counts and the FLOP model (``jomed_fast.scoring.flops``) of each method on them.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings

import numpy as np
import torch

from bench import _harness as H
from jomed_fast import prompts as _prompts
from jomed_fast.scoring import Candidate, CandidateScorer
from jomed_fast.scoring import flops as F
from jomed_fast.tasks.verbalizer import build_verbalizer

CHUNK = 5  # prompts per generate call in the published code
MAX_NEW_TOKENS = 8


def make_workload(queries: int, kmax: int, image_size: int, seed: int):
    """B query images (test samples) and B lists of ``kmax`` candidates (index records drawn
    without replacement per query; a record drawn for two queries is one object, as in an index)."""
    from jomed_fast.data.synthetic import SyntheticGenerator

    index_size = max(64, 4 * kmax)
    gen = SyntheticGenerator(seed=seed, image_size=image_size, n_test=max(queries, 1), index_size=index_size)
    qimgs = [gen.sample("test", b).image for b in range(queries)]
    rng = np.random.default_rng(seed)
    records: dict[int, Candidate] = {}

    def record(i: int) -> Candidate:
        if i not in records:
            r = gen.index_record(i)
            records[i] = Candidate(r.image, r.text, r.id)
        return records[i]

    cands = [[record(int(i)) for i in rng.choice(index_size, kmax, replace=False)] for _ in range(queries)]
    return qimgs, cands


def add_reader_args(p) -> None:
    """The options :func:`load` reads."""
    p.add_argument("--size", choices=("tiny", "small"), default="tiny", help="embedded reader built on the fly")
    p.add_argument("--arch", choices=("qwen2_vl", "pixtral"), default="qwen2_vl")
    p.add_argument("--reader", default=None, help="a reader checkpoint directory (instead of --size/--arch)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quantization", choices=("none", "nf4", "int8"), default="none")
    p.add_argument("--dtype", default=None, help="compute dtype (default: fp32 on CPU, bf16 on CUDA)")


def load(args):
    """``(reader, path)`` for ``args.reader`` or the tiny ``args.arch`` / ``args.size`` reader."""
    from jomed_fast.readers import load_reader, tiny

    path = args.reader
    if path is None:
        # keyed by the builder's version: a cache left by an older build is never mistaken for this one
        path = os.path.join(
            tempfile.gettempdir(), "jomed_fast_readers", f"{args.arch}-{args.size}-build{tiny.BUILD_VERSION}"
        )
        H.log(f"building the {args.size} {args.arch} reader in {path} (skipped when already built)")
        path = str(tiny.build(args.arch, path, size=args.size))
    quant = None if args.quantization == "none" else args.quantization
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reader = load_reader(path, quantization=quant, device=args.device, dtype=args.dtype)
    for p in reader.model.parameters():
        p.requires_grad_(False)
    reader.eval()
    return reader, path


class Counter:
    """Real tokens into the language model and images into the vision tower, by forward hooks."""

    def __init__(self, reader):
        self.reader, self.tokens, self.images, self._handles = reader, 0, 0, []

    def __enter__(self):
        model = self.reader.hf_model.model

        def on_decoder(module, args, kwargs):
            mask = kwargs.get("attention_mask")
            x = kwargs.get("inputs_embeds")
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                self.tokens += int(mask.sum())
            elif x is not None:
                self.tokens += int(x.shape[0] * x.shape[1])

        def on_vision(module, args, kwargs):
            if self.reader.family == "qwen2_vl":
                grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
                self.images += int(grid.shape[0])
            else:
                pv = args[0] if args else kwargs["pixel_values"]
                self.images += int(pv.shape[0])

        tower = model.visual if self.reader.family == "qwen2_vl" else model.vision_tower
        self._handles = [
            self.reader.decoder.register_forward_pre_hook(on_decoder, with_kwargs=True),
            tower.register_forward_pre_hook(on_vision, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()


def _samples(task, layout, qimg, row):
    """(images, messages) of each of a query's K prompts, what ``encode_batch`` takes."""
    out = []
    for cand in row:
        messages, images = _prompts.build_messages(layout, task, qimg, None, cand)
        out.append((images, messages))
    return out


class HFBatched:
    """The K prompts of a query in one left-padded batch, one forward, ``logits_to_keep=1``."""

    method = "hf_batched"

    def __init__(self, reader, task, class_ids, layout):
        self.reader, self.task, self.class_ids, self.layout = reader, task, class_ids, layout

    @torch.no_grad()
    def __call__(self, qimgs, cands) -> torch.Tensor:
        out = []
        for q, row in zip(qimgs, cands):
            enc = self.reader.encode_batch(_samples(self.task, self.layout, q, row), padding_side="left")
            logits = self.reader.hf_model(**enc, use_cache=False, logits_to_keep=1).logits[:, -1]
            out.append(torch.log_softmax(logits[:, self.class_ids].float(), dim=-1))
        return torch.stack(out)


class ReferenceLoop:
    """The published code's structure: ``generate(max_new_tokens=8, use_cache=False)`` per chunk of
    5 ``paper`` prompts; class scores from the first step's full-vocabulary scores."""

    method = "reference_loop"
    layout = "paper"

    def __init__(self, reader, task, class_ids):
        self.reader, self.task, self.class_ids = reader, task, class_ids
        self.steps: list[int] = []  # decoding steps run, per prompt, in the last call
        self.check_logits = True  # compare scores with raw logits once

    @torch.no_grad()
    def __call__(self, qimgs, cands) -> torch.Tensor:
        proc, model = self.reader.processor, self.reader.hf_model
        self.steps = []
        out = []
        for q, row in zip(qimgs, cands):
            samples = _samples(self.task, self.layout, q, row)
            parts = []
            for c0 in range(0, len(samples), CHUNK):
                chunk = samples[c0 : c0 + CHUNK]
                enc = self.reader.encode_batch(chunk, padding_side="left")
                gen = model.generate(
                    **enc,
                    max_new_tokens=MAX_NEW_TOKENS,
                    use_cache=False,
                    do_sample=False,
                    output_scores=True,
                    output_logits=self.check_logits,
                    return_dict_in_generate=True,
                    pad_token_id=proc.pad_token_id,
                )
                first = gen.scores[0]
                if self.check_logits:
                    if not torch.equal(first, gen.logits[0]):
                        raise AssertionError(
                            "reference_loop: generate's scores differ from the raw logits "
                            "(a logits processor is active); class scores would be wrong"
                        )
                    self.check_logits = False
                self.steps.extend([len(gen.scores)] * len(chunk))
                parts.append(torch.log_softmax(first[:, self.class_ids].float(), dim=-1))
            out.append(torch.cat(parts))
        return torch.stack(out)


class Jomed:
    """``CandidateScorer(reader, task, layout).score`` on all B queries at once."""

    def __init__(self, reader, task, layout):
        self.method, self.layout = f"jomed_{layout}", layout
        self.scorer = CandidateScorer(reader, task, layout)

    @torch.no_grad()
    def __call__(self, qimgs, cands) -> torch.Tensor:
        return self.scorer.score(qimgs, None, cands)


def counted_call(m, fn, **timing) -> tuple[torch.Tensor, H.Timing, dict]:
    """``fn()`` (a call of method ``m``) timed by ``H.time_call(**timing)``, with what it computed:
    ``llm_tokens``, ``vision_images`` and, for the toolkit, ``suffix_padding`` (``ScoreStats``
    suffix slots / real suffix and class tokens); for ``reference_loop``, ``steps`` (per prompt)."""
    with Counter(m.scorer.reader if isinstance(m, Jomed) else m.reader) as counter:
        scores, t = H.time_call(fn, **timing)
    if isinstance(m, Jomed):
        st = m.scorer.last_stats
        counts = {
            "llm_tokens": st.llm_tokens,
            "vision_images": st.vision_images,
            "suffix_padding": st.suffix_slots / max(1, st.suffix_tokens + st.class_tokens),
        }
    else:
        counts = {"llm_tokens": counter.tokens, "vision_images": counter.images}
    counts["steps"] = list(m.steps) if isinstance(m, ReferenceLoop) else []
    return scores, t, counts


def check_agreement(runs: dict, tolerance: float) -> dict[str, float]:
    """Per run (name -> ``Run``: its method's layout, K, queries and checked-call scores), the max
    |Δ log p| against the runs of the other methods of its layout (over the queries both ran);
    raises ``AssertionError`` above ``tolerance``: no speed is reported for methods that disagree.
    NaN for a run no other method of its layout ran beside (``--methods``): nothing was compared."""
    diffs = {name: math.nan for name in runs}
    names = list(runs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            ra, rb = runs[a], runs[b]
            if ra.layout != rb.layout:
                continue
            n = min(ra.queries, rb.queries)
            d = float((ra.scores[:n].double() - rb.scores[:n].double()).abs().max())
            if not math.isfinite(d) or d > tolerance:
                raise AssertionError(
                    f"K={ra.K}: {a} and {b} disagree: max |Δ log p| = {d:.3g} > tolerance "
                    f"{tolerance:g}; no speed is reported for methods that compute different things"
                )
            diffs[a], diffs[b] = (d if math.isnan(diffs[x]) else max(diffs[x], d) for x in (a, b))
    return diffs


def build_methods(reader, task, names: list[str]) -> list:
    """The methods named (``hf_batched``: one per layout), in that order."""
    class_ids = list(build_verbalizer(task, reader.tokenizer).class_token_ids)
    out = []
    for name in names:
        if name == "reference_loop":
            out.append(ReferenceLoop(reader, task, class_ids))
        elif name == "hf_batched":
            out.extend(HFBatched(reader, task, class_ids, layout) for layout in _prompts.LAYOUTS)
        else:
            out.append(Jomed(reader, task, name[len("jomed_") :]))
    return out


def prompt_shapes(reader, task, layout: str, qimgs, cands) -> list[list[F.Prompt]]:
    """``[B][K]`` ``flops.Prompt``: each prompt's shared prefix (as ``split_query`` finds it) and
    suffix in tokens with the image placeholders expanded, and its images' patch counts."""
    proc = reader.processor
    info: dict[int, tuple[int, int]] = {}  # id(image) -> (placeholder tokens, patches)

    def image_info(img) -> tuple[int, int]:
        if id(img) not in info:
            out = proc.preprocess_images([_prompts.as_image(img)])
            tokens = len(proc.image_placeholder_ids(out, 0))
            if proc.family == "qwen2_vl":
                t, h, w = (int(x) for x in out["image_grid_thw"][0])
                patches = t * h * w
            else:
                h, w = (int(x) for x in out["image_sizes"][0])
                patches = (h // proc.patch_size) * (w // proc.patch_size)
            info[id(img)] = (tokens, patches)
        return info[id(img)]

    def length(ids: list[int], images: list) -> int:
        return len(ids) + sum(image_info(i)[0] - 1 for i in images)

    shapes = []
    for q, row in zip(qimgs, cands):
        split = _prompts.split_query(proc, layout, task, q, None, row)
        key = (tuple(split.prefix_ids), tuple(id(i) for i in split.prefix_images))
        P = length(split.prefix_ids, split.prefix_images)
        shapes.append(
            [
                F.Prompt(
                    prefix=(key, P),
                    suffix=length(seg, imgs),
                    images=tuple((id(i), image_info(i)[1]) for i in list(split.prefix_images) + list(imgs)),
                )
                for seg, imgs in zip(split.segments, split.segment_images)
            ]
        )
    return shapes


def method_flops(run, dec, vis, shapes: dict[str, list[list[F.Prompt]]], num_classes: int) -> F.Flops:
    """The FLOP model of ``run``'s method on the queries it ran (``run``: its method, layout, K,
    queries and, for ``reference_loop``, the decoding steps of each prompt)."""
    prompts = [p for row in shapes[run.layout][: run.queries] for p in row[: run.K]]
    if run.method == "hf_batched":
        return F.hf_forward_flops(dec, vis, prompts)
    if run.method == "reference_loop":
        return F.generate_flops(dec, vis, prompts, run.steps)
    return F.shared_prefix_flops(dec, vis, prompts, num_classes)


def padding_factors(shapes: list[list[F.Prompt]]) -> dict[str, float]:
    """Slots computed / real tokens when rows are right-padded to the longest: the toolkit's
    suffixes if one chunk held all B·K rows (the bench replaces it with what the scorer's
    length-aware chunks computed, from ``ScoreStats``, where a toolkit method ran) and
    ``hf_batched``'s whole prompts (one batch per query). The FLOP model counts real tokens only;
    this is the padding it leaves out."""
    suffixes = [p.suffix for row in shapes for p in row]
    whole = sum(len(row) * max(p.tokens for p in row) for row in shapes)
    return {
        "jomed_suffix": len(suffixes) * max(suffixes) / max(1, sum(suffixes)),
        "hf_batched": whole / sum(p.tokens for row in shapes for p in row),
    }
