"""The candidate packer: B queries' shared prefixes and their K candidate segments → one padded batch.

In the ``shared_query`` layout every prompt of a query is ``prefix ∘ segment_k``: the prefix
(system prompt, query image, question) is identical for the K candidates, so the reader runs it
once and its KV-cache serves a right-padded batch of the K segments (``[retrieved image]
"background: {caption}"`` + answer cue). ``pack_candidates_batch`` builds that batch for B queries
(one query is a batch of one) with the C++ extension ``jomed_fast._C``, OpenMP across the B·K rows.
This docstring and ``pack_candidates_batch_reference``, the same function in plain Python written
to be read, are the packer's specification: ``csrc/packer.cpp`` documents only how it runs
(threads, memory), and the tests assert that both paths give identical tensors and errors.

Where ``_C`` is missing (installed without a compiler, or by an isolated build that had no torch),
fails to load, or was built against another torch release than the one running,
``pack_candidates_batch`` runs the Python packer instead, with one ``RuntimeWarning`` per process
saying why; ``JOMED_FAST_DISABLE_C=1`` chooses the Python packer without a warning. ``backend()``
says which packer runs and why.

Shapes (B queries, K candidates, P_b prefix lengths, Pm = max_b P_b, n_{b,k} segment lengths,
L = max_{b,k} n_{b,k} the longest suffix of the batch)::

    input_ids                [B, K, L]       segment tokens, right-padded with pad_token_id
    attention_mask           [B, K, Pm + L]  over prefix ++ suffix: 1 for the query's prefix
                                             slots j < P_b and real suffix tokens i < n, else 0
    position_ids             [B, K, L]       1-D positions continuing the prefix: P_b + i
    mrope_position_ids       [3, B, K, L]    Qwen2-VL (temporal, height, width) positions
    rope_deltas              [B, K]          max(3-D positions of prefix ++ segment) + 1 - (P_b + n)
    answer_position          [B, K]          n - 1, the last real suffix token, where the answer is
                                             read; -1 for an empty segment: read at the prefix's end
    suffix_lengths           [B, K]          n
    image_spans              [Nc, 5]         (b, k, start, length, image) per candidate image
    prefix_input_ids         [B, Pm]         prefixes, right-padded with pad_token_id
    prefix_lengths           [B]             P_b
    prefix_mrope_position_ids [3, B, Pm]     the prefixes' own 3-D positions
    prefix_rope_deltas       [B]             max(prefix 3-D positions) + 1 - P_b
    prefix_image_spans       [Np, 4]         (b, start, length, image) per prefix image

``image`` numbers the candidate images of the batch in (b, k, start) order — the order in which
their vision features are concatenated — and, separately, the prefix images in (b, start) order.

M-RoPE (``mrope=True``, Qwen2-VL / Qwen2.5-VL readers) numbers prefix ++ segment exactly as
transformers' ``Qwen2VLModel.get_rope_index`` numbers the full concatenated sequence. With a
running start s (0 at the first prefix token) and spatial merge size m:

* a text token gets (s, s, s), then s ← s + 1;
* an image span with patch grid (t, h, w) holds t·(h/m)·(w/m) tokens; token (a, b, c) in row-major
  order over (t, h/m, w/m) gets (s + a, s + b, s + c), then s ← s + max(h, w)/m (for t = 1, every
  Qwen2-VL image, that is "largest position + 1");
* rope delta = (largest position of the sequence) + 1 - (its length), HF's ``rope_deltas``.

Padded slots (deterministic, documented, never attended): they are numbered as if the padding were
text continuing the sequence, ``position_ids = P_b + i`` and all three M-RoPE axes ``s + (i - n)``
with s the running start after the segment; prefix padding likewise. ``mrope=False`` (Pixtral-style
readers with 1-D RoPE) skips the 3-D positions (those fields are None) and the image grids, and
takes the spans' lengths as given.

Inputs are checked: ``TypeError``/``ValueError`` naming the argument, what was expected and what
came. Type, dtype and rank are checked when a ``QueryCandidates`` is built; values (offsets, span
bounds and order, grid ↔ span length) when packing, by both paths, with the same messages.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import threading
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import NamedTuple, Optional

import torch

__all__ = [
    "Backend",
    "backend",
    "QueryCandidates",
    "PackedBatch",
    "pack_candidates_batch",
    "pack_candidates_batch_reference",
]

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def _check_long(name: str, value: object, ndim: int, shape: str, columns: Optional[int] = None) -> Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dtype != torch.int64:
        raise TypeError(f"{name}: expected dtype int64, got {value.dtype}")
    if value.dim() != ndim or (columns is not None and value.shape[1] != columns):
        raise ValueError(f"{name}: expected {ndim}-D {shape}, got shape {tuple(value.shape)}")
    if value.device.type != "cpu":
        raise ValueError(f"{name}: expected a CPU tensor (the packer runs on CPU), got {value.device}")
    return value


def _no_spans(columns: int) -> Tensor:
    return torch.empty(0, columns, dtype=torch.int64)


@dataclasses.dataclass(frozen=True)
class QueryCandidates:
    """One query: its shared prefix and its K candidate segments, as token ids.

    Attributes:
        prefix_ids: ``[P]`` int64, the prefix shared by the K prompts (may be empty).
        candidate_ids: ``[T]`` int64, the K segments back to back, T = Σ_k n_k.
        candidate_offsets: ``[K + 1]`` int64, segment k is ``candidate_ids[off[k]:off[k+1]]``;
            ``off[0] = 0``, non-decreasing, ``off[K] = T``. K ≥ 1; a segment may be empty.
        prefix_image_spans: ``[Np, 2]`` int64 (start, length) of the prefix's image-placeholder
            spans, sorted by start, not overlapping.
        prefix_image_grid_thw: ``[Np, 3]`` int64 patch grids (t, h, w) of those images, as the
            Qwen2-VL image processor returns them (``image_grid_thw``); None when ``mrope=False``.
        candidate_image_spans: ``[Nc, 3]`` int64 (k, start within segment k, length), sorted by
            (k, start), not overlapping.
        candidate_image_grid_thw: ``[Nc, 3]`` int64 grids of those images; None when ``mrope=False``.
    """

    prefix_ids: Tensor
    candidate_ids: Tensor
    candidate_offsets: Tensor
    prefix_image_spans: Tensor = dataclasses.field(default_factory=lambda: _no_spans(2))
    prefix_image_grid_thw: Optional[Tensor] = None
    candidate_image_spans: Tensor = dataclasses.field(default_factory=lambda: _no_spans(3))
    candidate_image_grid_thw: Optional[Tensor] = None

    def __post_init__(self) -> None:
        _check_long("prefix_ids", self.prefix_ids, 1, "[P]")
        _check_long("candidate_ids", self.candidate_ids, 1, "[T]")
        offsets = _check_long("candidate_offsets", self.candidate_offsets, 1, "[K + 1]")
        if offsets.numel() < 2:
            raise ValueError(f"candidate_offsets: expected [K + 1] with K >= 1, got shape {tuple(offsets.shape)}")
        for spans_name, grids_name, columns, what in (
            ("prefix_image_spans", "prefix_image_grid_thw", 2, "[Np, 2] (start, length)"),
            ("candidate_image_spans", "candidate_image_grid_thw", 3, "[Nc, 3] (k, start, length)"),
        ):
            spans = _check_long(spans_name, getattr(self, spans_name), 2, what, columns)
            grids = getattr(self, grids_name)
            if grids is not None:
                _check_long(grids_name, grids, 2, "[N, 3] (t, h, w)", 3)
                if grids.shape[0] != spans.shape[0]:
                    raise ValueError(
                        f"{grids_name}: expected one row per row of {spans_name} ({spans.shape[0]}), "
                        f"got {grids.shape[0]}"
                    )

    @property
    def num_candidates(self) -> int:
        """K."""
        return self.candidate_offsets.numel() - 1

    @classmethod
    def from_lists(
        cls,
        prefix_ids: Sequence[int] | Tensor,
        segments: Sequence[Sequence[int] | Tensor],
        *,
        prefix_images: Sequence[tuple[int, Sequence[int]]] = (),
        candidate_images: Optional[Sequence[Sequence[tuple[int, Sequence[int]]]]] = None,
        spatial_merge_size: int = 2,
    ) -> "QueryCandidates":
        """Builds the tensors from Python lists.

        ``prefix_images`` lists ``(start, (t, h, w))``; ``candidate_images[k]`` lists segment k's
        ``(start, (t, h, w))``. A span's length is t·h·w / spatial_merge_size², the number of
        placeholder tokens Qwen2-VL gives the image.
        """
        m2 = spatial_merge_size * spatial_merge_size
        ids = [torch.as_tensor(s, dtype=torch.int64).reshape(-1) for s in segments]
        lengths = torch.tensor([0] + [s.numel() for s in ids], dtype=torch.int64)
        images = candidate_images if candidate_images is not None else [[] for _ in segments]
        if len(images) != len(segments):
            raise ValueError(f"candidate_images: expected one list per segment ({len(segments)}), got {len(images)}")
        c_spans = [(k, start, t * h * w // m2) for k, imgs in enumerate(images) for start, (t, h, w) in imgs]
        c_grids = [tuple(g) for imgs in images for _, g in imgs]
        p_spans = [(start, t * h * w // m2) for start, (t, h, w) in prefix_images]
        p_grids = [tuple(g) for _, g in prefix_images]
        return cls(
            prefix_ids=torch.as_tensor(prefix_ids, dtype=torch.int64).reshape(-1),
            candidate_ids=torch.cat(ids) if ids else torch.empty(0, dtype=torch.int64),
            candidate_offsets=torch.cumsum(lengths, 0),
            prefix_image_spans=torch.tensor(p_spans, dtype=torch.int64).reshape(-1, 2),
            prefix_image_grid_thw=torch.tensor(p_grids, dtype=torch.int64).reshape(-1, 3),
            candidate_image_spans=torch.tensor(c_spans, dtype=torch.int64).reshape(-1, 3),
            candidate_image_grid_thw=torch.tensor(c_grids, dtype=torch.int64).reshape(-1, 3),
        )


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """B queries packed; shapes and conventions in the module docstring. M-RoPE fields are None
    with ``mrope=False``."""

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    mrope_position_ids: Optional[Tensor]
    rope_deltas: Optional[Tensor]
    answer_position: Tensor
    suffix_lengths: Tensor
    image_spans: Tensor
    prefix_input_ids: Tensor
    prefix_lengths: Tensor
    prefix_mrope_position_ids: Optional[Tensor]
    prefix_rope_deltas: Optional[Tensor]
    prefix_image_spans: Tensor

    def to(self, *args, **kwargs) -> "PackedBatch":
        """Every tensor field ``.to(*args, **kwargs)`` (e.g. ``device, non_blocking=True``)."""
        moved = {
            f.name: (v.to(*args, **kwargs) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
            for f in dataclasses.fields(self)
        }
        return PackedBatch(**moved)


# ---------------------------------------------------------------------------------------------
# Argument checks shared by both paths
# ---------------------------------------------------------------------------------------------


def _check_args(pad_token_id: object, spatial_merge_size: object, mrope: object) -> None:
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
        raise TypeError(f"pad_token_id: expected an int, got {type(pad_token_id).__name__}")
    if isinstance(spatial_merge_size, bool) or not isinstance(spatial_merge_size, int):
        raise TypeError(f"spatial_merge_size: expected an int, got {type(spatial_merge_size).__name__}")
    if spatial_merge_size < 1:
        raise ValueError(f"spatial_merge_size: expected an integer >= 1, got {spatial_merge_size}")
    if not isinstance(mrope, bool):
        raise TypeError(f"mrope: expected a bool, got {type(mrope).__name__}")


def _check_query(name: str, query: object, mrope: bool) -> QueryCandidates:
    if not isinstance(query, QueryCandidates):
        raise TypeError(f"{name}: expected a QueryCandidates, got {type(query).__name__}")
    if mrope:
        for spans, grids in (
            ("prefix_image_spans", "prefix_image_grid_thw"),
            ("candidate_image_spans", "candidate_image_grid_thw"),
        ):
            if getattr(query, grids) is None and getattr(query, spans).shape[0] > 0:
                raise ValueError(f"{name}.{grids}: expected [N, 3] image grids with mrope=True, got None")
    return query


def _check_queries(queries: object, mrope: bool) -> list[QueryCandidates]:
    if isinstance(queries, QueryCandidates) or not isinstance(queries, Sequence):
        raise TypeError(f"queries: expected a sequence of QueryCandidates, got {type(queries).__name__}")
    if len(queries) == 0:
        raise ValueError("queries: expected at least one query, got none")
    return [_check_query(f"queries[{b}]", q, mrope) for b, q in enumerate(queries)]


# ---------------------------------------------------------------------------------------------
# Which packer runs: jomed_fast._C, or the Python reference
# ---------------------------------------------------------------------------------------------

_DISABLE_C_ENV = "JOMED_FAST_DISABLE_C"


class Backend(NamedTuple):
    """The packer behind ``pack_candidates_batch``.

    ``name``: ``"c++"`` (the extension ``jomed_fast._C``) or ``"python"`` (the reference).
    ``reason``: for ``"c++"`` the torch the extension was built against; for ``"python"`` why the
    extension is not used.
    """

    name: str
    reason: str


_CHOICE: Optional[tuple[Backend, Optional[ModuleType]]] = None  # decided on first use, once a process
_CHOICE_LOCK = threading.Lock()


def _release(version: str) -> tuple[int | str, ...]:
    """(major, minor, patch) of a torch version: "2.13.0+cpu" and the headers' "2.13.0" are one ABI.
    Exact, not major.minor: torch promises no C++ ABI across releases; the fallback costs only speed."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    return tuple(int(x) for x in match.groups()) if match else (version,)


def _load_extension() -> tuple[Optional[ModuleType], str]:
    """(``jomed_fast._C`` or None, the reason); importlib throughout, so that tests can stand a module
    in for either import through ``sys.modules``."""
    running = torch.__version__
    try:  # written at build time next to _C; read before loading a binary that may not fit this torch
        built = importlib.import_module("jomed_fast._build_info").TORCH_VERSION
    except (ImportError, AttributeError):
        built = None
    if built is not None and _release(built) != _release(running):
        return None, f"jomed_fast._C was built against torch {built}, this is torch {running}"
    try:
        module = importlib.import_module("jomed_fast._C")  # torch is imported: _C needs its symbols
    except Exception as error:  # e.g. ImportError: undefined symbol, from a build against another torch
        if isinstance(error, ModuleNotFoundError) and error.name == "jomed_fast._C":
            return None, (
                "jomed_fast._C is not installed (it is built only where torch and a C++ compiler "
                "are present at install time)"
            )
        return None, f"jomed_fast._C failed to load ({type(error).__name__}: {error})"
    compiled = getattr(module, "TORCH_VERSION", None)  # the torch headers it was compiled with
    if compiled is None:
        return None, "jomed_fast._C records no torch version (built by an older setup.py)"
    if _release(compiled) != _release(running):
        return None, f"jomed_fast._C was built against torch {compiled}, this is torch {running}"
    return module, f"jomed_fast._C, built against torch {built or compiled}"


def _choice() -> tuple[Backend, Optional[ModuleType]]:
    global _CHOICE
    if _CHOICE is None:
        with _CHOICE_LOCK:  # one decision and at most one warning, even from concurrent first calls
            if _CHOICE is None:
                disable = os.environ.get(_DISABLE_C_ENV, "")
                if disable not in ("", "0", "1"):
                    raise ValueError(f"{_DISABLE_C_ENV}: expected 1 (the Python packer) or 0 / unset, got {disable!r}")
                if disable == "1":
                    module, reason = None, f"{_DISABLE_C_ENV}=1"
                else:
                    module, reason = _load_extension()
                    if module is None:
                        warnings.warn(
                            f"{reason}: using the Python packer (same output, slower); for the C++ packer "
                            "reinstall jomed_fast here with `pip install --no-build-isolation --no-deps "
                            "--force-reinstall <jomed_fast source>` (needs torch and a C++ compiler)",
                            RuntimeWarning,
                            stacklevel=2,
                        )
                _CHOICE = (Backend("c++" if module is not None else "python", reason), module)
    return _CHOICE


def backend() -> Backend:
    """Which packer ``pack_candidates_batch`` runs, and why; decided on the first call (of this or of
    the packer), once per process."""
    return _choice()[0]


def _c_inputs(q: QueryCandidates) -> list[Tensor]:
    none3 = _no_spans(3)
    return [
        q.prefix_ids,
        q.prefix_image_spans,
        q.prefix_image_grid_thw if q.prefix_image_grid_thw is not None else none3,
        q.candidate_ids,
        q.candidate_offsets,
        q.candidate_image_spans,
        q.candidate_image_grid_thw if q.candidate_image_grid_thw is not None else none3,
    ]


def _pack(queries: list[QueryCandidates], pad_token_id, spatial_merge_size, mrope, num_threads, name) -> PackedBatch:
    ext = _choice()[1]
    if ext is None:
        return _reference_batch(queries, pad_token_id, spatial_merge_size, mrope, name)
    out = ext.pack_batch(
        [_c_inputs(q) for q in queries],
        pad_token_id,
        spatial_merge_size,
        mrope,
        num_threads if num_threads is not None else 0,
        name,
    )
    return PackedBatch(**dict(zip(ext.OUTPUT_NAMES, out)))


def pack_candidates_batch(
    queries: Sequence[QueryCandidates],
    *,
    pad_token_id: int,
    spatial_merge_size: int = 2,
    mrope: bool = True,
    num_threads: Optional[int] = None,
) -> PackedBatch:
    """Packs B queries with the same K (C++, OpenMP across the B·K rows; see ``backend()``).

    Args:
        queries: B ``QueryCandidates``, all with the same number of candidates K.
        pad_token_id: the id written into padded slots of ``input_ids`` / ``prefix_input_ids``.
        spatial_merge_size: the Qwen2-VL vision merge m (an image holds t·h·w/m² tokens).
        mrope: compute Qwen2-VL 3-D positions (needs the image grids); False for 1-D RoPE readers.
        num_threads: OpenMP threads of the C++ packer (the Python one runs on the calling thread);
            None uses ``torch.get_num_threads()``. Batches of fewer than 2^18 output elements
            (2 MiB) run on one thread whatever this says. On a CPU that is oversubscribed (other
            jobs, data-loader workers) pass 1: an OpenMP join waits until every worker has been
            scheduled, which then costs milliseconds.

    Returns:
        ``PackedBatch`` (shapes in the module docstring).
    """
    _check_args(pad_token_id, spatial_merge_size, mrope)
    if num_threads is not None and (
        isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1
    ):
        raise ValueError(f"num_threads: expected None or an int >= 1, got {num_threads!r}")
    qs = _check_queries(queries, mrope)
    return _pack(qs, pad_token_id, spatial_merge_size, mrope, num_threads, "queries")


# ---------------------------------------------------------------------------------------------
# The reference: plain Python, the specification
# ---------------------------------------------------------------------------------------------


def _grid_list(grids: Optional[Tensor]) -> list:
    """Grid rows as lists; None (allowed when there are no spans) means no rows."""
    return grids.tolist() if grids is not None else []


def _check_values(name: str, q: QueryCandidates, mrope: bool, merge: int) -> None:
    """The value checks the C++ path makes, with the same messages."""
    P, T = q.prefix_ids.numel(), q.candidate_ids.numel()
    offsets = q.candidate_offsets.tolist()
    K = len(offsets) - 1
    where = f"{name}.candidate_offsets"
    if offsets[0] != 0 or offsets[K] != T:
        raise ValueError(
            f"{where}: expected offsets[0] = 0 and offsets[K] = {T} (candidate_ids.numel()), "
            f"got {offsets[0]} and {offsets[K]}"
        )
    for k in range(K):
        if offsets[k + 1] < offsets[k]:
            raise ValueError(
                f"{where}: expected non-decreasing offsets, got offsets[{k + 1}] = {offsets[k + 1]} "
                f"< offsets[{k}] = {offsets[k]}"
            )
        if P + offsets[k + 1] - offsets[k] < 1:
            raise ValueError(
                f"{where}: expected every prefix + segment to hold a token to read the answer at, "
                f"got an empty segment {k} after an empty prefix"
            )

    def check_span(where, row, start, length, n, previous_end):
        if length < 1 or start < 0 or start > n - length:
            raise ValueError(
                f"{where}: expected 0 <= start, 1 <= length, start + length <= {n} (the sequence's "
                f"length), got row {row} = (start {start}, length {length})"
            )
        if start < previous_end:
            raise ValueError(
                f"{where}: expected spans sorted by start and not overlapping, got row {row} starting "
                f"at {start} before the previous span's end {previous_end}"
            )

    def check_grid(where, row, grid, length):
        t, h, w = grid
        if t < 1 or h < 1 or w < 1:
            raise ValueError(f"{where}: expected grid (t, h, w) >= 1, got row {row} = ({t}, {h}, {w})")
        if h % merge or w % merge:
            raise ValueError(
                f"{where}: expected h and w divisible by spatial_merge_size = {merge}, got row {row} = ({t}, {h}, {w})"
            )
        if t * (h // merge) * (w // merge) != length:
            raise ValueError(
                f"{where}: expected t*h*w/spatial_merge_size^2 = the span's length {length}, "
                f"got row {row} = ({t}, {h}, {w}) with spatial_merge_size = {merge}"
            )

    end = 0
    p_grids = _grid_list(q.prefix_image_grid_thw) if mrope else []
    for row, (start, length) in enumerate(q.prefix_image_spans.tolist()):
        check_span(f"{name}.prefix_image_spans", row, start, length, P, end)
        end = start + length
        if mrope:
            check_grid(f"{name}.prefix_image_grid_thw", row, p_grids[row], length)

    c_grids = _grid_list(q.candidate_image_grid_thw) if mrope else []
    k_previous, end = -1, 0
    for row, (k, start, length) in enumerate(q.candidate_image_spans.tolist()):
        if k < k_previous or k >= K:
            after = f" after candidate {k_previous}" if k < k_previous else ""
            raise ValueError(
                f"{name}.candidate_image_spans: expected column 0 (candidate) non-decreasing in "
                f"[0, {K}), got row {row} with candidate {k}{after}"
            )
        if k != k_previous:
            k_previous, end = k, 0
        check_span(f"{name}.candidate_image_spans", row, start, length, offsets[k + 1] - offsets[k], end)
        end = start + length
        if mrope:
            check_grid(f"{name}.candidate_image_grid_thw", row, c_grids[row], length)


def _mrope_positions(length: int, images: list, merge: int, start: int) -> tuple[list, int]:
    """3-D positions of one sequence of ``length`` tokens, continuing from running start ``start``.

    ``images``: ``[(span_start, span_length, (t, h, w))]`` sorted by span_start. Returns the
    ``[(t, h, w)]`` position of every token and the running start after the sequence.
    """
    positions = []

    def text(count):
        nonlocal start
        for _ in range(count):  # text advances all three axes together
            positions.append((start, start, start))
            start += 1

    cursor = 0
    for span_start, span_length, (t, h, w) in images:
        text(span_start - cursor)
        for a in range(t):  # the image: its merged grid, offset by the running start
            for b in range(h // merge):
                for c in range(w // merge):
                    positions.append((start + a, start + b, start + c))
        start += max(h, w) // merge  # HF: text after the image restarts here
        cursor = span_start + span_length
    text(length - cursor)
    return positions, start


def _reference_batch(queries, pad_token_id, merge, mrope, name) -> PackedBatch:
    for b, q in enumerate(queries):
        _check_values(f"{name}[{b}]", q, mrope, merge)
    K = queries[0].num_candidates
    for b, q in enumerate(queries):
        if q.num_candidates != K:
            raise ValueError(
                f"{name}[{b}].candidate_offsets: expected the same number of candidates K = {K} as "
                f"{name}[0], got K = {q.num_candidates}"
            )

    prefixes = [q.prefix_ids.tolist() for q in queries]
    segments = []  # segments[b][k]: token list
    for q in queries:
        ids, off = q.candidate_ids.tolist(), q.candidate_offsets.tolist()
        segments.append([ids[off[k] : off[k + 1]] for k in range(K)])
    Pm = max(len(p) for p in prefixes)
    L = max(len(s) for segs in segments for s in segs)

    out: dict[str, list] = {
        key: []
        for key in (
            "input_ids",
            "attention_mask",
            "position_ids",
            "answer_position",
            "suffix_lengths",
            "image_spans",
            "prefix_input_ids",
            "prefix_lengths",
            "prefix_image_spans",
            "mrope",
            "rope_deltas",
            "prefix_mrope",
            "prefix_rope_deltas",
        )
    }
    image, prefix_image = 0, 0
    for b, q in enumerate(queries):
        prefix, P = prefixes[b], len(prefixes[b])
        out["prefix_input_ids"].append(prefix + [pad_token_id] * (Pm - P))
        out["prefix_lengths"].append(P)
        p_spans = q.prefix_image_spans.tolist()
        for start, length in p_spans:
            out["prefix_image_spans"].append([b, start, length, prefix_image])
            prefix_image += 1

        c_spans = q.candidate_image_spans.tolist()
        if mrope:
            p_grids = _grid_list(q.prefix_image_grid_thw)
            p_images = [(s, n, g) for (s, n), g in zip(p_spans, p_grids)]
            prefix_positions, prefix_end = _mrope_positions(P, p_images, merge, 0)
            prefix_max = max((max(p) for p in prefix_positions), default=-1)
            out["prefix_mrope"].append(prefix_positions + _padding_positions(prefix_end, Pm - P))
            out["prefix_rope_deltas"].append(prefix_max + 1 - P)
            c_grids = _grid_list(q.candidate_image_grid_thw)

        for k, segment in enumerate(segments[b]):
            n = len(segment)
            out["input_ids"].append(segment + [pad_token_id] * (L - n))
            out["attention_mask"].append([1] * P + [0] * (Pm - P) + [1] * n + [0] * (L - n))
            out["position_ids"].append([P + i for i in range(L)])
            out["answer_position"].append(n - 1)
            out["suffix_lengths"].append(n)
            rows = [r for r, span in enumerate(c_spans) if span[0] == k]
            for r in rows:
                out["image_spans"].append([b, k, c_spans[r][1], c_spans[r][2], image])
                image += 1
            if mrope:
                images = [(c_spans[r][1], c_spans[r][2], c_grids[r]) for r in rows]
                positions, end = _mrope_positions(n, images, merge, prefix_end)
                largest = max([prefix_max] + [max(p) for p in positions])
                out["mrope"].append(positions + _padding_positions(end, L - n))
                out["rope_deltas"].append(largest + 1 - (P + n))

    B = len(queries)

    def long(rows, *shape):
        return torch.tensor(rows, dtype=torch.int64).reshape(*shape)

    def axes_first(rows, *shape):  # [rows..., 3] → [3, rows...]
        return long(rows, *shape, 3).permute(-1, *range(len(shape))).contiguous()

    return PackedBatch(
        input_ids=long(out["input_ids"], B, K, L),
        attention_mask=long(out["attention_mask"], B, K, Pm + L),
        position_ids=long(out["position_ids"], B, K, L),
        mrope_position_ids=axes_first(out["mrope"], B, K, L) if mrope else None,
        rope_deltas=long(out["rope_deltas"], B, K) if mrope else None,
        answer_position=long(out["answer_position"], B, K),
        suffix_lengths=long(out["suffix_lengths"], B, K),
        image_spans=long(out["image_spans"], -1, 5),
        prefix_input_ids=long(out["prefix_input_ids"], B, Pm),
        prefix_lengths=long(out["prefix_lengths"], B),
        prefix_mrope_position_ids=axes_first(out["prefix_mrope"], B, Pm) if mrope else None,
        prefix_rope_deltas=long(out["prefix_rope_deltas"], B) if mrope else None,
        prefix_image_spans=long(out["prefix_image_spans"], -1, 4),
    )


def _padding_positions(start: int, count: int) -> list:
    """Padded slots are numbered as text continuing the sequence (masked; deterministic)."""
    return [(start + i,) * 3 for i in range(count)]


def pack_candidates_batch_reference(
    queries: Sequence[QueryCandidates], *, pad_token_id: int, spatial_merge_size: int = 2, mrope: bool = True
) -> PackedBatch:
    """``pack_candidates_batch`` in plain Python (the specification); identical output and errors."""
    _check_args(pad_token_id, spatial_merge_size, mrope)
    qs = _check_queries(queries, mrope)
    return _reference_batch(qs, pad_token_id, spatial_merge_size, mrope, "queries")
