r"""Inference: retrieve, score every candidate with the reader, fuse, decide, write JSONL.

For a batch of B queries (images + questions):

1. **retrieve** (NVTX ``jomed.retrieve``): the retriever's query embeddings ``[B, D]``, the top
   ``k_text`` of the text head and ``k_image`` of the image head (``K = k_T + k_I``, default 2 + 2 as
   the reference) — or, for the robustness study (paper Table 7), no retrieval (``K = 1``, the plain
   query prompt) or random retrieval, two ways (``RETRIEVAL_MODES``): ``random_records``
   (``random``), K index records drawn uniformly with uniform weights from the index less the
   query's own records (``exclude_self``: same id or image digest; this project's reading of the
   paper's "random retrieval"); ``random_query``, what the authors' code does
   (``--random_query`` in ``src/jomed.py``): a standard-normal query vector drawn in place of each
   head's query embedding, its top ``k_text`` / ``k_image`` neighbours retrieved and fused by their
   scores like retrieved ones;
2. **score** (``jomed.score``): ``CandidateScorer`` -> class log-probs ``[B, K, C]`` (query image
   optionally left out: the "no query image" row of Table 7);
3. **fuse** (``jomed.fuse``): ``fusion.fuse`` (``paper`` or ``reference``) -> ``p(c | q)`` ``[B, C]``,
   then ``fusion.decide`` (argmax, or the multi-label threshold);
   Open VQA (``open_vqa``): K greedy answers per query instead, fused by ``open_fusion``: the
   paper's marginal ``sum_k softmax(s)_k p(a_j | z_k, q)`` over the K candidate answers
   (``paper``, default) or this project's vote over identical normalised strings
   (``vote``);
4. **write**: one :class:`~jomed_fast.analysis.prediction_records.PredictionRecord` per query, with every
   candidate's record id, head, retrieval score, class probabilities and individual prediction, so
   the analyses (inconsistent split, oracle, rerankers) can be redone offline.

Predictions are appended to the JSONL batch by batch (flushed and fsynced) under an exclusive lock
(``output.PredictionsFile``); a rerun skips the queries already written (a torn last line from a
crash is dropped), so an interrupted run resumes. The sidecar ``<out>.meta.json`` holds the run's
identity (:func:`predict_identity`: the reader's weights and adapter, the index, the query
encoder, the samples' content, the task, the layout and every option that changes a result); a
rerun from other inputs is refused, naming them, rather than mixing two runs in one file. Options
that cannot change a result (batch size, progress) never block a resume. Random retrieval draws each
query's records (or query vectors) from a generator seeded by (seed, query id), so a resumed run
draws what an uninterrupted one would. A reader whose stage-1 adapter recorded another prompt
layout than the scorer's is refused, naming both, unless ``allow_layout_mismatch``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from .._checks import is_int, is_number
from .._profiling import stage
from ..analysis.prediction_records import Candidate as CandidateRecord
from ..analysis.prediction_records import PredictionRecord
from ..readers.hf_reader import check_trained_layout
from .fusion import FUSIONS, decide, fuse
from .open_vqa import OPEN_FUSIONS, fuse_open_answers, generate_answer_tokens, paper_open_answer
from .output import PredictionsFile, read_predictions

__all__ = [
    "RETRIEVAL_ALIASES",
    "RETRIEVAL_MODES",
    "InferConfig",
    "check_inputs",
    "encoder_fingerprint",
    "predict",
    "predict_identity",
    "random_queries",
    "read_predictions",
    "result_options",
]

RETRIEVAL_MODES = ("retrieved", "none", "random_records", "random_query")
# an older name, kept for configs and commands written with it
RETRIEVAL_ALIASES = {"random": "random_records"}
IDENTITY_FORMAT = "jomed-predictions-v2"


@dataclasses.dataclass(frozen=True)
class InferConfig:
    """Inference settings (JSON-serialisable; the CLI maps one flag to each field). Every field is
    checked when the config is made, so a bad setting fails before any model loads.

    Attributes:
        k_text, k_image: candidates from each head (reference: 2 + 2).
        layout: prompt layout, ``"paper"`` or ``"shared_query"``.
        fusion: ``"paper"`` (``sum_k p_k softmax(s)_k``) or ``"reference"`` (see ``fusion``).
        tau: retrieval-score temperature of the ``paper`` fusion (finite, > 0).
        threshold: multi-label decision threshold on the fused per-label probability, in (0, 1].
        batch_size: queries per scorer call (cannot change a result).
        retrieval: ``"retrieved"``, ``"none"`` (no retrieval), ``"random_records"`` (uniform
            records, uniform weights; ``"random"`` is read as it) or ``"random_query"`` (the
            authors' code: the neighbours of a random query vector per head, weighted by their
            scores); see the module docstring.
        query_image: False leaves the query image out of the prompt (robustness study).
        seed: the random-retrieval seed (each query's draw is seeded by (seed, query id)).
        max_new_tokens: the greedy answer's length limit (open VQA).
        open_fusion: open VQA's fusion, ``"paper"`` (the marginal over candidate answers) or
            ``"vote"`` (this project's rule; ``open_vqa``).
        allow_layout_mismatch: score with ``layout`` even when the reader's stage-1 adapter
            recorded another (cannot change a result, so not in the identity).
    """

    k_text: int = 2
    k_image: int = 2
    layout: str = "paper"
    fusion: str = "paper"
    tau: float = 1.0
    threshold: float = 0.5
    batch_size: int = 4
    retrieval: str = "retrieved"
    query_image: bool = True
    seed: int = 0
    max_new_tokens: int = 16
    open_fusion: str = "paper"
    allow_layout_mismatch: bool = False

    def __post_init__(self):
        from ..prompts import LAYOUTS

        object.__setattr__(self, "retrieval", RETRIEVAL_ALIASES.get(self.retrieval, self.retrieval))
        for name in ("k_text", "k_image", "batch_size", "seed", "max_new_tokens"):
            if not is_int(getattr(self, name)):
                raise TypeError(f"{name}: expected an int, got {getattr(self, name)!r}")
        if self.k_text < 0 or self.k_image < 0 or self.k_text + self.k_image == 0:
            raise ValueError(f"k_text, k_image: expected >= 0 with a positive sum, got {self.k_text}, {self.k_image}")
        for name, choices in (
            ("layout", LAYOUTS),
            ("fusion", FUSIONS),
            ("retrieval", RETRIEVAL_MODES),
            ("open_fusion", OPEN_FUSIONS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}: expected one of {choices}, got {getattr(self, name)!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {self.batch_size}")
        if not (is_number(self.tau) and math.isfinite(self.tau) and self.tau > 0):  # inf: uniform weights, silently
            raise ValueError(f"tau: expected a finite number > 0, got {self.tau!r}")
        if not (is_number(self.threshold) and 0.0 < self.threshold <= 1.0):
            raise ValueError(f"threshold: expected a number in (0, 1], got {self.threshold!r}")
        for name in ("query_image", "allow_layout_mismatch"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected >= 1, got {self.max_new_tokens}")

    @property
    def k(self) -> int:
        return 1 if self.retrieval == "none" else self.k_text + self.k_image


def check_inputs(config: InferConfig, retrieval=None, encoder=None) -> None:
    """What the retrieval mode needs, checked before any model runs or any file is written: an index
    (``retrieval``) for every mode but ``none``, a query encoder for ``retrieved``, and ``k_text``,
    ``k_image`` no larger than the index for ``retrieved`` and ``random_query``."""
    if config.retrieval == "none":
        return
    if retrieval is None:
        raise ValueError(
            f"retrieval: retrieval={config.retrieval!r} needs an index (a Retrieval over the index "
            "and its records); give one, or use retrieval='none'"
        )
    n = len(retrieval.records)
    if n == 0:
        raise ValueError("retrieval: the index has no records")
    if config.retrieval == "random_records":
        return
    if encoder is None and config.retrieval == "retrieved":
        raise ValueError("encoder: retrieval='retrieved' needs the retriever's query encoder (encode_images)")
    for name in ("k_text", "k_image"):
        if getattr(config, name) > n:
            raise ValueError(f"{name}: expected at most the index's {n} records, got {getattr(config, name)}")


# --------------------------------------------------------------------------------------------- identity
def result_options(config: InferConfig, task) -> dict:
    """The settings that can change a prediction of ``task``, by name. Left out: the batch size, and
    whatever the retrieval mode does not use (k and the fusion without retrieval, tau where every
    score is 0, the threshold of a single-label task)."""
    c = config
    # retrieved and random_query both search the index per head and fuse by the scores
    retrieved = c.retrieval in ("retrieved", "random_query")
    opts: dict = {"retrieval": c.retrieval, "query_image": c.query_image}
    if retrieved:
        opts.update(k_text=c.k_text, k_image=c.k_image)
    if c.retrieval == "random_records":
        opts.update(k=c.k, seed=c.seed)
    if c.retrieval == "random_query":
        opts["seed"] = c.seed
    if task.is_open:
        opts.update(max_new_tokens=c.max_new_tokens, open_fusion=c.open_fusion)
        if retrieved:
            opts["tau"] = c.tau
        return opts
    if retrieved:
        opts["fusion"] = c.fusion
        if c.fusion == "paper":
            opts["tau"] = c.tau
    if task.is_multilabel:
        opts["threshold"] = c.threshold
    return opts


def encoder_fingerprint(encoder) -> str:
    """The query encoder's content: its own ``fingerprint()`` (TinyCLIP, Hugging Face CLIP), else, for
    a torch module (the stage-2 ``HeadEncoders``), every tensor of its state and every plain setting
    of its submodules (``alpha``, train/eval mode)."""
    if callable(getattr(encoder, "fingerprint", None)):
        return str(encoder.fingerprint())
    if not isinstance(encoder, torch.nn.Module):
        raise TypeError(f"encoder: expected a fingerprint() method or a torch module, got {type(encoder).__name__}")
    h = hashlib.sha256(f"{type(encoder).__module__}.{type(encoder).__qualname__}".encode())
    for name, module in encoder.named_modules():
        plain = {
            k: v
            for k, v in vars(module).items()
            if not k.startswith("_") and (v is None or isinstance(v, (bool, int, float, str)))
        }
        h.update(json.dumps([name, type(module).__qualname__, plain], sort_keys=True).encode())
    for name, t in sorted(encoder.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def predict_identity(
    scorer,
    samples: Sequence,
    *,
    retrieval=None,
    encoder=None,
    config: InferConfig = InferConfig(),
    inputs: Mapping[str, object] | None = None,
) -> dict:
    """The identity a predictions file stores and a resume must match (``jomed_fast.identity``).

    Content, never paths: the reader (weights, quantization, CPU kernel, LoRA in memory), the task,
    the layout, the samples (``records_digest``: ids, answers, labels, questions, image bytes), the
    result-changing options (``option.<name>``, :func:`result_options`), and what the retrieval mode
    reads: the index records (random, retrieved), the index and the query encoder (retrieved).
    ``inputs``: more ``{name: digest}`` from the caller (the CLI adds the query-encoder folder's).
    """
    from ..data import records_digest
    from ..readers.fingerprint import reader_fingerprint

    task = scorer.task
    identity: dict = {
        "format": IDENTITY_FORMAT,
        "reader": reader_fingerprint(scorer.reader),
        "task": task.identity,
        "layout": scorer.layout,
        "samples": records_digest(samples),
    }
    identity.update({f"option.{k}": v for k, v in result_options(config, task).items()})
    if task.is_multilabel:  # the largest answer set the reader's scores cover
        identity["max_labels"] = getattr(scorer.head, "max_labels", None)
    if config.retrieval != "none":
        identity["index_records"] = records_digest(retrieval.records)
    if config.retrieval == "random_records":
        identity["exclusion"] = retrieval.exclusion.identity()
    if config.retrieval in ("retrieved", "random_query"):
        identity["index"] = retrieval.index.digest()
    if config.retrieval == "retrieved":
        identity["encoder"] = encoder_fingerprint(encoder)
        identity["exclusion"] = retrieval.exclusion.identity()
    for name, value in (inputs or {}).items():
        if name in identity:
            raise ValueError(f"inputs: {name!r} is already part of the identity")
        identity[name] = value
    return identity


# --------------------------------------------------------------------------------------------- steps
def _query_generator(seed: int, query_id: str) -> torch.Generator:
    """The random-retrieval generator of one query: seeded by (seed, query id), so a query's draw
    does not depend on which queries came before it (a resumed run draws the same records)."""
    digest = hashlib.sha256(json.dumps([seed, query_id]).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def random_queries(seed: int, query_ids: Sequence[str], dim: int) -> dict[str, torch.Tensor]:
    """``{"text": [B, D], "image": [B, D]}`` standard-normal query vectors, one per query and head
    (the authors' code draws one per head search), each query's from its own generator
    (:func:`_query_generator`), the text head's first."""
    text, image = [], []
    for qid in query_ids:
        g = _query_generator(seed, str(qid))
        text.append(torch.randn(dim, generator=g))
        image.append(torch.randn(dim, generator=g))
    return {"text": torch.stack(text), "image": torch.stack(image)}


def random_rows(n: int, own: Sequence[int], k: int, generator: torch.Generator) -> torch.Tensor:
    """``[k]`` index rows drawn uniformly, with replacement, from the ``n`` rows less ``own`` (the
    query's own records): a draw ``r`` in ``[0, n - |own|)`` steps past each own row ``e <= r`` in
    ascending order, which maps the allowed rows onto that range one to one."""
    skip = sorted(set(int(e) for e in own))
    if len(skip) >= n:
        raise ValueError(f"retrieval: every one of the index's {n} records is the query itself; nothing to draw")
    rows = torch.randint(n - len(skip), (k,), generator=generator)
    for e in skip:
        rows += (rows >= e).long()
    return rows


def _candidates(config: InferConfig, retrieval, encoder, batch, images):
    """(candidates [B][K], scores [B, K], heads [B][K], record ids [B][K]) for one batch."""
    B = len(batch)
    if config.retrieval == "none":
        return [[None] for _ in range(B)], torch.zeros(B, 1), [["none"] for _ in range(B)], [["-"] for _ in range(B)]
    if config.retrieval == "random_records":
        n = len(retrieval.records)
        own = retrieval.own_rows(batch)
        rows = [random_rows(n, mine, config.k, _query_generator(config.seed, str(s.id))) for s, mine in zip(batch, own)]
        cands = [[retrieval.candidate(int(r)) for r in row] for row in rows]
        ids = [[c.id for c in row] for row in cands]
        return cands, torch.zeros(B, config.k), [["random"] * config.k for _ in range(B)], ids
    if config.retrieval == "random_query":
        q = random_queries(config.seed, [str(s.id) for s in batch], retrieval.index.dim)
    else:
        with torch.no_grad():
            q = encoder.encode_images(images)
    got = retrieval.search(q, config.k_text, config.k_image, queries=batch)
    ids = [[c.id for c in row] for row in got.candidates]
    return got.candidates, got.scores.float(), got.heads, ids


def _records(task, batch, log_probs, scores, heads, ids, fused, config) -> list[PredictionRecord]:
    multilabel = task.is_multilabel
    per_candidate = [decide(log_probs[:, k].exp(), multilabel, config.threshold) for k in range(log_probs.shape[1])]
    fused_pred = decide(fused, multilabel, config.threshold)
    out = []
    for b, sample in enumerate(batch):
        gold = sorted(sample.label) if multilabel else int(sample.label)
        cands = [
            CandidateRecord(
                id=str(ids[b][k]),
                head=heads[b][k],
                score=float(scores[b, k]),
                probs=[float(p) for p in log_probs[b, k].exp()],
                prediction=per_candidate[k][b],
            )
            for k in range(log_probs.shape[1])
        ]
        out.append(
            PredictionRecord(
                query_id=str(sample.id),
                gold=gold,
                kind=task.kind,
                candidates=cands,
                fused=fused_pred[b],
                fused_probs=[float(p) for p in fused[b]],
            )
        )
    return out


def _open_records(scorer, batch, images, cands, scores, heads, ids, config) -> list[PredictionRecord]:
    """Open VQA: K greedy answers per query, fused over normalised strings (``open_vqa``)."""
    out = []
    for b, sample in enumerate(batch):
        with stage("jomed.generate"):
            answers, mean_lp, tokens = generate_answer_tokens(
                scorer.reader,
                scorer.task,
                scorer.layout,
                images[b] if config.query_image else None,
                sample.question,
                cands[b],
                config.max_new_tokens,
            )
        weights = torch.softmax(scores[b].double() / config.tau, 0)
        if config.open_fusion == "paper":
            fused, _ = paper_open_answer(
                scorer.reader,
                scorer.task,
                scorer.layout,
                images[b] if config.query_image else None,
                sample.question,
                cands[b],
                tokens,
                weights,
            )
        else:
            fused, _ = fuse_open_answers(answers, mean_lp, weights)
        cand_recs = [
            CandidateRecord(
                id=str(ids[b][k]),
                head=heads[b][k],
                score=float(scores[b, k]),
                probs=[float(mean_lp[k].exp())],
                prediction=answers[k],
            )
            for k in range(len(answers))
        ]
        out.append(
            PredictionRecord(
                query_id=str(sample.id),
                gold=str(sample.answer),
                kind=scorer.task.kind,
                candidates=cand_recs,
                fused=fused,
            )
        )
    return out


def _predict_batch(scorer, batch, retrieval, encoder, config: InferConfig) -> list[PredictionRecord]:
    task = scorer.task
    images = [s.load_image() for s in batch]
    with stage("jomed.retrieve"):
        cands, scores, heads, rec_ids = _candidates(config, retrieval, encoder, batch, images)
    if task.is_open:
        return _open_records(scorer, batch, images, cands, scores, heads, rec_ids, config)
    with stage("jomed.score"), torch.no_grad():
        log_probs = scorer.score(
            images if config.query_image else [None] * len(batch), [s.question for s in batch], cands
        ).float()
    with stage("jomed.fuse"):
        # random records have no scores to normalise per head: the paper rule (uniform weights)
        method = config.fusion if config.retrieval in ("retrieved", "random_query") else "paper"
        fused = fuse(log_probs, scores, heads, method, config.tau, multilabel=task.is_multilabel)
    return _records(task, batch, log_probs, scores, heads, rec_ids, fused, config)


def _run(scorer, samples, retrieval, encoder, config, done: dict, write, progress: bool) -> None:
    """Predict the samples not in ``done``, batch by batch; ``write(records)`` each batch first."""
    todo = [s for s in samples if str(s.id) not in done]
    with tqdm(total=len(samples), initial=len(samples) - len(todo), desc="predict", disable=not progress) as bar:
        for lo in range(0, len(todo), config.batch_size):
            batch = todo[lo : lo + config.batch_size]
            new = _predict_batch(scorer, batch, retrieval, encoder, config)
            if write is not None:
                write(new)
            done.update((r.query_id, r) for r in new)
            bar.update(len(batch))


def predict(
    scorer,
    samples: Sequence,
    *,
    retrieval=None,
    encoder=None,
    config: InferConfig = InferConfig(),
    out_path: str | os.PathLike | None = None,
    progress: bool = True,
    inputs: Mapping[str, object] | None = None,
) -> list[PredictionRecord]:
    """Predict every sample; returns the records in sample order (and appends them to ``out_path``).

    Args:
        scorer: a ``CandidateScorer`` (its reader, task and layout are used as they are); for an
            open-VQA task an ``OpenAnswerer(reader, task, layout)``.
        samples: ``jomed_fast.data`` samples (``id``, ``load_image()``, ``question``, ``label``), unique ids.
        retrieval: a ``jomed_fast.candidate_retrieval.Retrieval`` (not needed for ``retrieval="none"``).
        encoder: the retriever's query encoder (``encode_images``), for ``retrieval="retrieved"``.
        out_path: JSONL to append to and resume from (None: keep in memory only); see ``output``.
        inputs: more identity entries ``{name: digest}`` (:func:`predict_identity`).

    Everything is checked (settings, index size, an ``out_path`` that could be resumed) before the
    first query is scored; a resume from other inputs raises ``IdentityMismatch`` naming them.
    """
    if config.layout != scorer.layout:
        raise ValueError(f"config: layout {config.layout!r} differs from the scorer's {scorer.layout!r}")
    check_trained_layout(
        scorer.reader, scorer.layout, "the inference layout (InferConfig.layout)", config.allow_layout_mismatch
    )
    ids = [str(s.id) for s in samples]
    if len(set(ids)) != len(ids):
        twice = sorted(i for i, n in Counter(ids).items() if n > 1)[:3]
        raise ValueError(f"samples: expected unique ids (predictions are resumed by id), got {twice} more than once")
    check_inputs(config, retrieval, encoder)
    if out_path is None:
        done: dict[str, PredictionRecord] = {}
        _run(scorer, samples, retrieval, encoder, config, done, None, progress)
        return [done[i] for i in ids]
    identity = predict_identity(scorer, samples, retrieval=retrieval, encoder=encoder, config=config, inputs=inputs)
    with PredictionsFile(out_path, identity, query_ids=ids) as out:
        _run(scorer, samples, retrieval, encoder, config, out.done, out.append, progress)
        return [out.done[i] for i in ids]
