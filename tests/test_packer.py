"""The candidate packer: C++ (jomed_fast._C) against its plain-Python reference, and the M-RoPE
numbering against the unmodified transformers ``Qwen2VLModel.get_rope_index``.

* Exact equality of every output of ``pack_candidates_batch`` on each packer (the C++ one and the
  Python fallback, chosen explicitly) and the reference on random queries (hypothesis): empty
  segments, K = 1, one caption much longer than the rest, segments with 0, 1 or 2 images, prefixes
  with and without an image, t > 1 grids, merge sizes 1 and 2, several queries with different
  prefix lengths; and each query of a batch packed as it is alone.
* The other tests call ``pack_candidates_batch`` on the packer ``backend()`` chose for the process: the
  C++ one in a dev install, the Python one under ``JOMED_FAST_DISABLE_C=1`` (where the C++-only
  test cases skip), so ``JOMED_FAST_DISABLE_C=1 pytest tests/test_packer.py`` tests the fallback.
* The choice itself: ``JOMED_FAST_DISABLE_C=1``, a missing or unloadable extension, and one built
  against another torch each give the Python packer, with exactly one warning where one is due.
* Independent check: for every (query, candidate), the packed 3-D positions of prefix ++ segment
  and the rope delta equal what a tiny real ``Qwen2VLModel`` computes over the concatenated
  sequence — alone, and in the padded [K, P + L] batch with the packer's attention mask.
* Bad inputs raise the documented TypeError/ValueError, with the same message on both paths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import subprocess
import sys
import types
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jomed_fast import packing
from jomed_fast.packing import (
    Backend,
    PackedBatch,
    QueryCandidates,
    pack_candidates_batch,
    pack_candidates_batch_reference,
)

PAD = 151643
IMAGE_TOKEN = 151655  # Qwen2-VL's <|image_pad|>; the packer itself never looks at token values

# jomed_fast._C where this process may run the C++ packer: not under JOMED_FAST_DISABLE_C=1
CPP = None if os.environ.get("JOMED_FAST_DISABLE_C") == "1" else packing._load_extension()[0]
PACKERS = [
    pytest.param(
        "c++",
        marks=pytest.mark.skipif(
            CPP is None,
            reason="the C++ packer is unavailable here: "
            "JOMED_FAST_DISABLE_C=1, or jomed_fast._C "
            "does not load (see packing.backend())",
        ),
    ),
    "python",
]


@contextlib.contextmanager
def packer(name: str):
    """``pack_candidates_batch`` runs on the named packer inside the block, whatever ``backend()`` chose."""
    assert name == "python" or CPP is not None, "the C++ packer is unavailable here"
    saved = packing._CHOICE
    packing._CHOICE = (Backend(name, "chosen by the test"), CPP if name == "c++" else None)
    try:
        yield
    finally:
        packing._CHOICE = saved


# ---------------------------------------------------------------------------------------------
# Random queries
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Piece:
    """A run of text tokens, or one image (grid (t, h, w)) — a sequence is a list of pieces."""

    text: list[int] | None = None
    grid: tuple[int, int, int] | None = None


def flatten(pieces: list[Piece], merge: int) -> tuple[list[int], list[int], list[tuple[int, tuple]]]:
    """Token ids, mm_token_type_ids (0 text, 1 image) and [(start, grid)] of a piece list."""
    ids, types, images = [], [], []
    for p in pieces:
        if p.text is not None:
            ids += p.text
            types += [0] * len(p.text)
        else:
            t, h, w = p.grid
            images.append((len(ids), p.grid))
            n = t * h * w // (merge * merge)
            ids += [IMAGE_TOKEN] * n
            types += [1] * n
    return ids, types, images


@st.composite
def sequences(draw, merge, max_images, max_text=6, separated=True, long_text=False):
    """A piece list with 0..max_images images; text runs of >= 1 token between (and around) images
    when ``separated`` (a chat template always wraps an image in vision_start/vision_end)."""
    n_images = draw(st.integers(0, max_images))
    grid = st.tuples(
        st.integers(1, 2), st.integers(1, 3).map(lambda x: x * merge), st.integers(1, 3).map(lambda x: x * merge)
    )
    text_hi = 60 if long_text else max_text
    pieces = []
    for i in range(n_images + 1):
        # >= 1 text token around every image, which also keeps images off the prefix/segment
        # boundary, where HF's grouping by token type would merge two images into one
        lo = 1 if separated and n_images else 0
        n = draw(st.integers(lo, max(lo, text_hi)))
        pieces.append(Piece(text=draw(st.lists(st.integers(0, 999), min_size=n, max_size=n))))
        if i < n_images:
            pieces.append(Piece(grid=draw(grid)))
    return pieces


@st.composite
def batches(draw, separated=True, max_queries=3, max_k=5):
    """(merge, [per query: (prefix pieces, [segment pieces] * K)]) with a common K."""
    merge = draw(st.sampled_from([1, 2]))
    K = draw(st.integers(1, max_k))
    B = draw(st.integers(1, max_queries))
    queries = []
    for _ in range(B):
        prefix = draw(sequences(merge, max_images=1, max_text=8, separated=separated))
        segments = []
        long_one = draw(st.integers(-1, K - 1))  # one caption much longer than the rest, or none
        prefix_tokens = len(flatten(prefix, merge)[0])
        for k in range(K):
            if prefix_tokens and draw(st.integers(0, 4)) == 0:
                segments.append([])  # an empty segment: the answer is read at the prefix's end
                continue
            segment = draw(sequences(merge, max_images=2, separated=separated, long_text=k == long_one))
            if not prefix_tokens and not flatten(segment, merge)[0]:
                segment.append(Piece(text=[1]))  # the packer rejects an empty prefix ++ segment
            segments.append(segment)
        queries.append((prefix, segments))
    return merge, queries


def build(merge: int, prefix: list[Piece], segments: list[list[Piece]]) -> QueryCandidates:
    p_ids, _, p_images = flatten(prefix, merge)
    flat = [flatten(s, merge) for s in segments]
    return QueryCandidates.from_lists(
        p_ids,
        [f[0] for f in flat],
        prefix_images=p_images,
        candidate_images=[f[2] for f in flat],
        spatial_merge_size=merge,
    )


def assert_same(a, b) -> None:
    """Every field equal: same presence, dtype, shape and values."""
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if x is None or y is None:
            assert x is None and y is None, f.name
            continue
        assert x.dtype == y.dtype == torch.int64, f.name
        assert x.shape == y.shape, (f.name, x.shape, y.shape)
        assert torch.equal(x, y), (f.name, x, y)


def assert_packed_alone_as_in_batch(alone: PackedBatch, batch: PackedBatch, b: int) -> None:
    """``alone`` (query b packed by itself) is query b's part of ``batch``: its rows cut to its own
    prefix length P and longest segment L, its image numbers counted from its first image."""
    P, L, Pm = alone.prefix_input_ids.shape[1], alone.input_ids.shape[2], batch.prefix_input_ids.shape[1]
    pairs = [
        (alone.input_ids[0], batch.input_ids[b, :, :L]),
        (alone.attention_mask[0, :, :P], batch.attention_mask[b, :, :P]),
        (alone.attention_mask[0, :, P:], batch.attention_mask[b, :, Pm : Pm + L]),
        (alone.position_ids[0], batch.position_ids[b, :, :L]),
        (alone.answer_position[0], batch.answer_position[b]),
        (alone.suffix_lengths[0], batch.suffix_lengths[b]),
        (alone.prefix_input_ids[0], batch.prefix_input_ids[b, :P]),
        (alone.prefix_lengths[0], batch.prefix_lengths[b]),
    ]
    if alone.mrope_position_ids is not None:
        pairs += [
            (alone.mrope_position_ids[:, 0], batch.mrope_position_ids[:, b, :, :L]),
            (alone.rope_deltas[0], batch.rope_deltas[b]),
            (alone.prefix_mrope_position_ids[:, 0], batch.prefix_mrope_position_ids[:, b, :P]),
            (alone.prefix_rope_deltas[0], batch.prefix_rope_deltas[b]),
        ]
    for spans_alone, spans in (
        (alone.image_spans, batch.image_spans),
        (alone.prefix_image_spans, batch.prefix_image_spans),
    ):
        rows = spans[spans[:, 0] == b].clone()
        rows[:, 0] = 0
        rows[:, -1] -= int((spans[:, 0] < b).sum())
        pairs.append((spans_alone, rows))
    for i, (x, y) in enumerate(pairs):
        assert x.shape == y.shape and torch.equal(x, y), (i, x, y)


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# C++ == reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PACKERS)
@SETTINGS
@given(batch=batches(separated=False), mrope=st.booleans())
def test_packers_match_reference_random(name, batch, mrope):
    """Each packer gives the reference's batch, every field bitwise; so the C++ and Python packers
    give identical batches."""
    merge, raw = batch
    queries = [build(merge, p, s) for p, s in raw]
    kwargs = dict(pad_token_id=PAD, spatial_merge_size=merge, mrope=mrope)
    with packer(name):
        packed = pack_candidates_batch(queries, **kwargs)
        alone = [pack_candidates_batch([q], **kwargs) for q in queries]
    assert_same(packed, pack_candidates_batch_reference(queries, **kwargs))
    if name == "c++":  # and, said directly, the Python packer's batch
        with packer("python"):
            assert_same(packed, pack_candidates_batch(queries, **kwargs))
    for b, (q, single) in enumerate(zip(queries, alone)):
        assert_same(single, pack_candidates_batch_reference([q], **kwargs))
        assert_packed_alone_as_in_batch(single, packed, b)


@SETTINGS
@given(batches(separated=False))
def test_layout_invariants(batch):
    """Properties the reader relies on, stated without the reference."""
    merge, raw = batch
    queries = [build(merge, p, s) for p, s in raw]
    out = pack_candidates_batch(queries, pad_token_id=PAD, spatial_merge_size=merge)
    B, K, L = out.input_ids.shape
    Pm = out.prefix_input_ids.shape[1]
    for b, q in enumerate(queries):
        P = q.prefix_ids.numel()
        assert torch.equal(out.prefix_input_ids[b, :P], q.prefix_ids)
        assert (out.prefix_input_ids[b, P:] == PAD).all()
        off = q.candidate_offsets.tolist()
        for k in range(K):
            n = off[k + 1] - off[k]
            assert torch.equal(out.input_ids[b, k, :n], q.candidate_ids[off[k] : off[k + 1]])
            assert (out.input_ids[b, k, n:] == PAD).all()
            expected_mask = [1] * P + [0] * (Pm - P) + [1] * n + [0] * (L - n)
            assert out.attention_mask[b, k].tolist() == expected_mask
            assert out.position_ids[b, k].tolist() == list(range(P, P + L))
            assert int(out.answer_position[b, k]) == n - 1
        for row in out.image_spans[out.image_spans[:, 0] == b].tolist():
            _, k, start, length, image = row
            seg = q.candidate_ids[off[k] : off[k + 1]]
            assert (seg[start : start + length] == IMAGE_TOKEN).all()
    assert out.image_spans[:, 4].tolist() == list(range(out.image_spans.shape[0]))  # concatenation order
    assert out.prefix_image_spans[:, 3].tolist() == list(range(out.prefix_image_spans.shape[0]))


def test_threads_do_not_change_the_result():
    """A batch big enough for the parallel path, packed on 1 and on 2 threads and by the reference."""
    rng = random.Random(0)
    merge = 2
    queries = []
    for _ in range(8):
        prefix = [Piece(text=[1] * rng.randint(1, 20)), Piece(grid=(1, 8, 8)), Piece(text=[2] * rng.randint(1, 20))]
        segments = [[Piece(text=[3]), Piece(grid=(1, 8, 6)), Piece(text=[4] * rng.randint(0, 150))] for _ in range(50)]
        segments[rng.randrange(40)] = []
        queries.append(build(merge, prefix, segments))
    one = pack_candidates_batch(queries, pad_token_id=PAD, num_threads=1)
    two = pack_candidates_batch(queries, pad_token_id=PAD, num_threads=2)
    assert one.input_ids.numel() * 5 >= 1 << 18  # really above the parallel threshold
    assert_same(one, two)
    assert_same(one, pack_candidates_batch_reference(queries, pad_token_id=PAD))


# ---------------------------------------------------------------------------------------------
# Named cases, with literal expectations
# ---------------------------------------------------------------------------------------------


def test_worked_example():
    """Prefix [a, IMG(1,4,4)×4, b, c], segments [x, IMG(1,2,4)×2, y], [] and a 10-token caption."""
    q = QueryCandidates.from_lists(
        [7, 9, 9, 9, 9, 8, 8],
        [[5, 9, 9, 6], [], list(range(100, 110))],
        prefix_images=[(1, (1, 4, 4))],
        candidate_images=[[(1, (1, 2, 4))], [], []],
    )
    for pack in (pack_candidates_batch, pack_candidates_batch_reference):
        out = pack([q], pad_token_id=0)
        assert isinstance(out, PackedBatch)
        # prefix: text 0; image at s=1: t=1, h,w in {1,2}; s += 2 → 3; text 3, 4. Largest 4, P=7.
        assert out.prefix_mrope_position_ids[:, 0].tolist() == [
            [0, 1, 1, 1, 1, 3, 4],
            [0, 1, 1, 2, 2, 3, 4],
            [0, 1, 2, 1, 2, 3, 4],
        ]
        assert out.prefix_rope_deltas.tolist() == [4 + 1 - 7]
        assert out.prefix_lengths.tolist() == [7]
        T, H, W = out.mrope_position_ids[:, 0]
        # segment 0 starts at s=5: x=5; image (1, 1, 2) merged grid at s=6: (6,6,6), (6,6,7); s=8: y=8
        assert T[0, :4].tolist() == [5, 6, 6, 8] and H[0, :4].tolist() == [5, 6, 6, 8]
        assert W[0, :4].tolist() == [5, 6, 7, 8]
        assert T[0, 4:].tolist() == [9, 10, 11, 12, 13, 14]  # padding continues as text
        assert T[1].tolist() == list(range(5, 15))  # empty segment: all padding
        assert T[2].tolist() == list(range(5, 15))
        assert out.rope_deltas.tolist() == [[8 + 1 - 11, 4 + 1 - 7, 14 + 1 - 17]]
        assert out.answer_position.tolist() == [[3, -1, 9]]
        assert out.suffix_lengths.tolist() == [[4, 0, 10]]
        assert out.input_ids[0, 1].tolist() == [0] * 10
        assert out.attention_mask[0, 1].tolist() == [1] * 7 + [0] * 10
        assert out.position_ids[0, 0].tolist() == list(range(7, 17))
        assert out.image_spans.tolist() == [[0, 0, 1, 2, 0]]
        assert out.prefix_image_spans.tolist() == [[0, 1, 4, 0]]


@pytest.mark.parametrize(
    "case",
    ["k1", "all_empty", "long_caption", "two_images", "prefix_without_image", "empty_prefix", "adjacent_images"],
)
def test_named_cases(case):
    m = 2

    def text(n):
        return Piece(text=list(range(1, n + 1)))

    def img(t=1, h=2, w=2):
        return Piece(grid=(t, h, w))

    prefix = [text(3), img(1, 4, 4), text(2)]
    segments = {
        "k1": [[img(), text(4)]],
        "all_empty": [[], [], []],
        "long_caption": [[text(2)], [img(), text(300)], [text(1)], []],
        "two_images": [[text(1), img(1, 2, 4), text(2), img(2, 4, 2), text(1)], [img(), img()], [text(3)]],
        "prefix_without_image": [[text(3)], [img(1, 6, 2)]],
        "empty_prefix": [[text(1)], [img(), text(2)]],
        "adjacent_images": [[img(), img(1, 4, 4)], [img(2, 2, 2)]],
    }[case]
    if case == "prefix_without_image":
        prefix = [text(5)]
    if case == "empty_prefix":
        prefix = []
    if case == "adjacent_images":
        prefix = [text(1), img()]  # the segment's image directly follows the prefix's
    q = build(m, prefix, segments)
    for mrope in (True, False):
        fast = pack_candidates_batch([q], pad_token_id=PAD, spatial_merge_size=m, mrope=mrope)
        assert_same(fast, pack_candidates_batch_reference([q], pad_token_id=PAD, spatial_merge_size=m, mrope=mrope))
        assert fast.input_ids.shape == (1, len(segments), max(len(flatten(s, m)[0]) for s in segments))
        assert (fast.mrope_position_ids is None) == (not mrope)
    if case == "adjacent_images":
        # each image is numbered by its own grid (HF's get_rope_index cannot express this case:
        # it would merge the two spans into one group)
        out = pack_candidates_batch([q], pad_token_id=PAD, spatial_merge_size=m)
        assert out.prefix_mrope_position_ids[:, 0].tolist() == [[0, 1], [0, 1], [0, 1]]
        assert out.mrope_position_ids[:, 0, 0, :5].tolist() == [[2, 3, 3, 3, 3], [2, 3, 3, 4, 4], [2, 3, 4, 3, 4]]
        assert out.mrope_position_ids[:, 0, 1, :2].tolist() == [[2, 3], [2, 2], [2, 2]]


def test_mrope_false_needs_no_grids():
    q = QueryCandidates(
        prefix_ids=torch.arange(4),
        candidate_ids=torch.arange(9),
        candidate_offsets=torch.tensor([0, 5, 9]),
        candidate_image_spans=torch.tensor([[0, 1, 3], [1, 0, 2]]),  # e.g. Pixtral rows with [IMG_BREAK]
    )
    for pack in (pack_candidates_batch, pack_candidates_batch_reference):
        out = pack([q], pad_token_id=0, mrope=False)
        assert out.mrope_position_ids is None and out.rope_deltas is None
        assert out.prefix_mrope_position_ids is None and out.prefix_rope_deltas is None
        assert out.image_spans.tolist() == [[0, 0, 1, 3, 0], [0, 1, 0, 2, 1]]
    with pytest.raises(ValueError, match=r"queries\[0\]\.candidate_image_grid_thw: expected \[N, 3\] image grids"):
        pack_candidates_batch([q], pad_token_id=0)


def test_non_contiguous_inputs():
    base = torch.arange(40, dtype=torch.int64)
    q = QueryCandidates(
        prefix_ids=base[::2][:6], candidate_ids=base[1::2][:8], candidate_offsets=torch.tensor([0, 3, 8])
    )
    assert_same(pack_candidates_batch([q], pad_token_id=0), pack_candidates_batch_reference([q], pad_token_id=0))


def test_to_moves_every_tensor():
    q = build(2, [Piece(text=[1])], [[Piece(text=[2, 3])]])
    out = pack_candidates_batch([q], pad_token_id=0).to(torch.int32)
    assert out.input_ids.dtype == torch.int32 and out.mrope_position_ids.dtype == torch.int32


# ---------------------------------------------------------------------------------------------
# Independent check against transformers' get_rope_index
# ---------------------------------------------------------------------------------------------

_HF_MODELS: dict[int, object] = {}


def hf_model(merge: int):
    """A tiny, unmodified transformers Qwen2VLModel (random weights); only get_rope_index is used."""
    if merge not in _HF_MODELS:
        from transformers import Qwen2VLConfig
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

        config = Qwen2VLConfig(
            text_config=dict(
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                intermediate_size=32,
                vocab_size=152000,
                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
            ),
            vision_config=dict(
                depth=1, embed_dim=16, num_heads=2, hidden_size=16, mlp_ratio=1, spatial_merge_size=merge
            ),
        )
        _HF_MODELS[merge] = Qwen2VLModel(config).eval()
    return _HF_MODELS[merge]


def test_hf_model_uses_the_merge_size():
    for merge in (1, 2):
        assert hf_model(merge).config.vision_config.spatial_merge_size == merge


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches(separated=True, max_queries=2, max_k=4))
def test_mrope_matches_transformers_get_rope_index(batch):
    merge, raw = batch
    model = hf_model(merge)
    queries = [build(merge, p, s) for p, s in raw]
    out = pack_candidates_batch(queries, pad_token_id=PAD, spatial_merge_size=merge)
    Pm = out.prefix_input_ids.shape[1]
    for b, (prefix, segments) in enumerate(raw):
        p_ids, p_types, p_images = flatten(prefix, merge)
        P = len(p_ids)
        rows, row_types, grids, n_real = [], [], [], []
        for k, segment in enumerate(segments):
            s_ids, s_types, s_images = flatten(segment, merge)
            ids, types = p_ids + s_ids, p_types + s_types
            row_grids = [g for _, g in p_images] + [g for _, g in s_images]
            # the full concatenated sequence, alone
            hf_pos, hf_delta = model.get_rope_index(
                torch.tensor([ids]),
                mm_token_type_ids=torch.tensor([types]),
                image_grid_thw=torch.tensor(row_grids).reshape(-1, 3) if row_grids else None,
            )
            ours = torch.cat(
                [out.prefix_mrope_position_ids[:, b, :P], out.mrope_position_ids[:, b, k, : len(s_ids)]], 1
            )
            assert torch.equal(ours, hf_pos[:, 0]), (k, ours, hf_pos[:, 0])
            assert int(out.rope_deltas[b, k]) == int(hf_delta[0, 0])
            rows.append(ids)
            row_types.append(types)
            grids += row_grids
            n_real.append(len(ids))
        # the padded batch [K, Pm + L] a user without the packer would build, with our mask
        L = out.input_ids.shape[2]
        ids = torch.cat([out.prefix_input_ids[b].expand(len(segments), -1), out.input_ids[b]], 1)
        types = torch.zeros_like(ids)
        for _, k, start, length, _ in out.image_spans[out.image_spans[:, 0] == b].tolist():
            types[k, Pm + start : Pm + start + length] = 1
        for _, start, length, _ in out.prefix_image_spans[out.prefix_image_spans[:, 0] == b].tolist():
            types[:, start : start + length] = 1
        mask = out.attention_mask[b]
        hf_pos, hf_delta = model.get_rope_index(
            ids,
            mm_token_type_ids=types,
            image_grid_thw=torch.tensor(grids).reshape(-1, 3) if grids else None,
            attention_mask=mask,
        )
        ours = torch.cat(
            [out.prefix_mrope_position_ids[:, b : b + 1].expand(-1, len(segments), -1), out.mrope_position_ids[:, b]], 2
        )
        real = mask.bool().expand(3, -1, -1)
        assert torch.equal(ours[real], hf_pos[real])
        assert torch.equal(out.rope_deltas[b], hf_delta[:, 0])
        assert ids.shape == (len(segments), Pm + L)
        # the prefix alone (HF needs at least one token)
        if P:
            hf_pos, hf_delta = model.get_rope_index(
                torch.tensor([p_ids]),
                mm_token_type_ids=torch.tensor([p_types]),
                image_grid_thw=torch.tensor([g for _, g in p_images]).reshape(-1, 3) if p_images else None,
            )
            assert torch.equal(out.prefix_mrope_position_ids[:, b, :P], hf_pos[:, 0])
            assert int(out.prefix_rope_deltas[b]) == int(hf_delta[0, 0])


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------


def good_query(**overrides) -> dict:
    fields = dict(
        prefix_ids=torch.arange(6),
        candidate_ids=torch.arange(10),
        candidate_offsets=torch.tensor([0, 6, 10]),
        prefix_image_spans=torch.tensor([[1, 4]]),
        prefix_image_grid_thw=torch.tensor([[1, 4, 4]]),
        candidate_image_spans=torch.tensor([[0, 1, 2], [1, 0, 2]]),
        candidate_image_grid_thw=torch.tensor([[1, 2, 4], [2, 2, 2]]),
    )
    fields.update(overrides)
    return fields


def test_good_query_is_good():
    q = QueryCandidates(**good_query())
    assert_same(pack_candidates_batch([q], pad_token_id=0), pack_candidates_batch_reference([q], pad_token_id=0))


CONSTRUCTION_ERRORS = [
    (dict(prefix_ids=torch.arange(6, dtype=torch.int32)), TypeError, "prefix_ids: expected dtype int64"),
    (dict(prefix_ids=[1, 2]), TypeError, "prefix_ids: expected a torch.Tensor, got list"),
    (dict(candidate_ids=torch.zeros(2, 5, dtype=torch.long)), ValueError, r"candidate_ids: expected 1-D \[T\]"),
    (dict(candidate_offsets=torch.tensor([0])), ValueError, r"candidate_offsets: expected \[K \+ 1\] with K >= 1"),
    (dict(prefix_image_spans=torch.tensor([[1, 4, 0]])), ValueError, r"prefix_image_spans: expected 2-D \[Np, 2\]"),
    (
        dict(candidate_image_grid_thw=torch.tensor([[1, 2, 4]])),
        ValueError,
        r"candidate_image_grid_thw: expected one row per row of candidate_image_spans \(2\), got 1",
    ),
    (dict(prefix_ids=torch.arange(6, device="meta")), ValueError, "prefix_ids: expected a CPU tensor"),
]


@pytest.mark.parametrize("overrides,error,message", CONSTRUCTION_ERRORS)
def test_construction_errors(overrides, error, message):
    with pytest.raises(error, match=message):
        QueryCandidates(**good_query(**overrides))


VALUE_ERRORS = [
    (dict(candidate_offsets=torch.tensor([1, 6, 10])), "queries[0].candidate_offsets: expected offsets[0] = 0"),
    (dict(candidate_offsets=torch.tensor([0, 6, 9])), "and offsets[K] = 10 (candidate_ids.numel()), got 0 and 9"),
    (
        dict(
            candidate_offsets=torch.tensor([0, 6, 4, 10]),
            candidate_image_spans=torch.empty(0, 3, dtype=torch.long),
            candidate_image_grid_thw=torch.empty(0, 3, dtype=torch.long),
        ),
        "queries[0].candidate_offsets: expected non-decreasing offsets, got offsets[2] = 4 < offsets[1] = 6",
    ),
    (
        dict(
            prefix_ids=torch.empty(0, dtype=torch.long),
            prefix_image_spans=torch.empty(0, 2, dtype=torch.long),
            prefix_image_grid_thw=torch.empty(0, 3, dtype=torch.long),
            candidate_offsets=torch.tensor([0, 0, 10]),
            candidate_image_spans=torch.tensor([[1, 1, 2]]),
            candidate_image_grid_thw=torch.tensor([[1, 2, 4]]),
        ),
        "got an empty segment 0 after an empty prefix",
    ),
    (
        dict(prefix_image_spans=torch.tensor([[3, 4]])),
        "queries[0].prefix_image_spans: expected 0 <= start, 1 <= length, "
        "start + length <= 6 (the sequence's length), got row 0 = (start 3, length 4)",
    ),
    (
        dict(candidate_image_spans=torch.tensor([[0, 5, 2], [1, 0, 2]])),
        "queries[0].candidate_image_spans: expected 0 <= start",
    ),
    (dict(candidate_image_spans=torch.tensor([[0, -1, 2], [1, 0, 2]])), "got row 0 = (start -1, length 2)"),
    (dict(candidate_image_spans=torch.tensor([[0, 1, 0], [1, 0, 2]])), "got row 0 = (start 1, length 0)"),
    (
        dict(
            candidate_image_spans=torch.tensor([[1, 0, 2], [0, 1, 2]]),
            candidate_image_grid_thw=torch.tensor([[2, 2, 2], [1, 2, 4]]),
        ),
        "queries[0].candidate_image_spans: expected column 0 (candidate) non-decreasing in [0, 2), got row 1 with candidate 0 after candidate 1",
    ),
    (
        dict(candidate_image_spans=torch.tensor([[0, 1, 2], [2, 0, 2]])),
        "non-decreasing in [0, 2), got row 1 with candidate 2",
    ),
    (
        dict(
            candidate_image_spans=torch.tensor([[0, 0, 2], [0, 1, 2]]),
            candidate_image_grid_thw=torch.tensor([[1, 2, 4], [1, 2, 4]]),
        ),
        "queries[0].candidate_image_spans: expected spans sorted by start and not overlapping, got row 1 starting at 1 before the previous span's end 2",
    ),
    (
        dict(candidate_image_grid_thw=torch.tensor([[1, 2, 4], [2, 2, 3]])),
        "queries[0].candidate_image_grid_thw: expected h and w divisible by spatial_merge_size = 2, got row 1 = (2, 2, 3)",
    ),
    (
        dict(candidate_image_grid_thw=torch.tensor([[1, 2, 4], [1, 2, 2]])),
        "queries[0].candidate_image_grid_thw: expected t*h*w/spatial_merge_size^2 = the span's length 2, got row 1 = (1, 2, 2)",
    ),
    (
        dict(prefix_image_grid_thw=torch.tensor([[0, 4, 4]])),
        "queries[0].prefix_image_grid_thw: expected grid (t, h, w) >= 1, got row 0 = (0, 4, 4)",
    ),
    (
        dict(prefix_image_grid_thw=None),
        r"queries[0].prefix_image_grid_thw: expected [N, 3] image grids with mrope=True, got None",
    ),
]


@pytest.mark.parametrize("overrides,message", VALUE_ERRORS)
def test_value_errors_same_on_both_paths(overrides, message):
    q = QueryCandidates(**good_query(**overrides))
    messages = []
    for pack in (pack_candidates_batch, pack_candidates_batch_reference):
        with pytest.raises(ValueError) as info:
            pack([q], pad_token_id=0)
        messages.append(str(info.value))
    assert message in messages[0], messages[0]
    assert messages[0] == messages[1]
    # and further down a batch the message names that query
    messages = []
    for pack in (pack_candidates_batch, pack_candidates_batch_reference):
        with pytest.raises(ValueError) as info:
            pack([QueryCandidates(**good_query()), q], pad_token_id=0)
        messages.append(str(info.value))
    assert messages[0].startswith("queries[1].") and messages[0] == messages[1]


def test_grid_checks_are_skipped_without_mrope():
    q = QueryCandidates(**good_query(candidate_image_grid_thw=torch.tensor([[1, 2, 4], [2, 2, 3]])))
    assert_same(
        pack_candidates_batch([q], pad_token_id=0, mrope=False),
        pack_candidates_batch_reference([q], pad_token_id=0, mrope=False),
    )


def test_different_k_across_queries():
    a = QueryCandidates(**good_query())
    b = QueryCandidates(
        prefix_ids=torch.arange(3), candidate_ids=torch.arange(3), candidate_offsets=torch.tensor([0, 3])
    )
    for pack in (pack_candidates_batch, pack_candidates_batch_reference):
        with pytest.raises(
            ValueError,
            match=r"queries\[1\]\.candidate_offsets: expected the same number of candidates "
            r"K = 2 as queries\[0\], got K = 1",
        ):
            pack([a, b], pad_token_id=0)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(pad_token_id=1.0), TypeError, "pad_token_id: expected an int, got float"),
        (dict(pad_token_id=True), TypeError, "pad_token_id: expected an int, got bool"),
        (dict(pad_token_id=0, spatial_merge_size=0), ValueError, "spatial_merge_size: expected an integer >= 1, got 0"),
        (dict(pad_token_id=0, spatial_merge_size=2.0), TypeError, "spatial_merge_size: expected an int, got float"),
        (dict(pad_token_id=0, mrope=1), TypeError, "mrope: expected a bool, got int"),
    ],
)
def test_argument_errors(kwargs, error, message):
    q = QueryCandidates(**good_query())
    for pack in (pack_candidates_batch, pack_candidates_batch_reference):
        with pytest.raises(error, match=message):
            pack([q], **kwargs)


def test_query_and_queries_type_errors():
    q = QueryCandidates(**good_query())
    for pack in (pack_candidates_batch, pack_candidates_batch_reference):
        with pytest.raises(TypeError, match="queries: expected a sequence of QueryCandidates, got QueryCandidates"):
            pack(q, pad_token_id=0)
        with pytest.raises(ValueError, match="queries: expected at least one query, got none"):
            pack([], pad_token_id=0)
        with pytest.raises(TypeError, match=r"queries\[1\]: expected a QueryCandidates, got dict"):
            pack([q, {}], pad_token_id=0)
    with pytest.raises(ValueError, match="num_threads: expected None or an int >= 1, got 0"):
        pack_candidates_batch([q], pad_token_id=0, num_threads=0)


# ---------------------------------------------------------------------------------------------
# Which packer runs: the fallback to Python
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def undecided(monkeypatch):
    """The process has not chosen its packer yet (restored afterwards), JOMED_FAST_DISABLE_C unset."""
    monkeypatch.setattr(packing, "_CHOICE", None)
    monkeypatch.delenv("JOMED_FAST_DISABLE_C", raising=False)


def fake_extension(torch_version: str) -> types.ModuleType:
    """A stand-in for jomed_fast._C that records ``torch_version`` and fails if it is asked to pack."""
    module = types.ModuleType("jomed_fast._C")
    module.TORCH_VERSION = torch_version

    def pack_batch(*args, **kwargs):
        raise AssertionError(f"the extension built against torch {torch_version} was asked to pack")

    module.pack_batch = pack_batch
    return module


def build_info(torch_version: str) -> types.ModuleType:
    module = types.ModuleType("jomed_fast._build_info")
    module.TORCH_VERSION = torch_version
    return module


class FailingImport:
    """A meta-path finder under which importing ``jomed_fast._C`` raises ``error``."""

    def __init__(self, error: Exception):
        self.error = error

    def find_spec(self, name, path=None, target=None):
        if name == "jomed_fast._C":
            raise self.error
        return None


def pack_everything_and_record_warnings() -> list[warnings.WarningMessage]:
    """Asks for the backend and packs several times, as a process would; every warning recorded, and
    every result checked against the reference."""
    q = QueryCandidates(**good_query())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # a second warning must not hide behind the once-per-location filter
        for _ in range(2):
            packing.backend()
            assert_same(
                pack_candidates_batch([q], pad_token_id=0), pack_candidates_batch_reference([q], pad_token_id=0)
            )
            assert_same(
                pack_candidates_batch([q, q], pad_token_id=0), pack_candidates_batch_reference([q, q], pad_token_id=0)
            )
    return caught


def test_disable_env_forces_python_without_a_warning(undecided, monkeypatch):
    monkeypatch.setenv("JOMED_FAST_DISABLE_C", "1")
    monkeypatch.setitem(sys.modules, "jomed_fast._C", fake_extension(torch.__version__))  # fits; must not run
    caught = pack_everything_and_record_warnings()
    assert packing.backend() == Backend("python", "JOMED_FAST_DISABLE_C=1")
    assert [str(w.message) for w in caught] == []


def test_disable_env_in_a_fresh_process_never_imports_the_extension():
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOMED_FAST_")}
    code = (
        "import sys; from jomed_fast.packing import QueryCandidates, backend, pack_candidates_batch; "
        "pack_candidates_batch([QueryCandidates.from_lists([1, 2], [[3], [4, 5]])], pad_token_id=0); "
        "print(backend().name, 'jomed_fast._C' in sys.modules)"
    )
    run = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-c", code],
        env={**env, "JOMED_FAST_DISABLE_C": "1"},
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["python", "False"]


def test_disable_env_other_values(undecided, monkeypatch):
    monkeypatch.setenv("JOMED_FAST_DISABLE_C", "true")
    with pytest.raises(
        ValueError,
        match=r"JOMED_FAST_DISABLE_C: expected 1 \(the Python packer\) or 0 / unset, "
        r"got 'true'",
    ):
        packing.backend()
    monkeypatch.setenv("JOMED_FAST_DISABLE_C", "0")
    monkeypatch.setitem(sys.modules, "jomed_fast._build_info", None)
    monkeypatch.setitem(sys.modules, "jomed_fast._C", None)
    with pytest.warns(RuntimeWarning, match="jomed_fast._C is not installed"):
        assert packing.backend().name == "python"  # 0: the extension is wanted (and here missing)


@pytest.mark.parametrize(
    "how,expected",
    [
        ("missing", "jomed_fast._C is not installed (it is built only where torch and a C++ compiler are present"),
        ("unloadable", "jomed_fast._C failed to load (ImportError: _C.so: undefined symbol: _ZN3c104impl3cow"),
    ],
)
def test_unavailable_extension_falls_back_with_one_warning(undecided, monkeypatch, how, expected):
    monkeypatch.setitem(sys.modules, "jomed_fast._build_info", None)  # an install without _C has neither
    if how == "missing":
        monkeypatch.setitem(sys.modules, "jomed_fast._C", None)  # importing it raises ModuleNotFoundError
    else:
        monkeypatch.delitem(sys.modules, "jomed_fast._C", raising=False)
        error = ImportError("_C.so: undefined symbol: _ZN3c104impl3cow11cow_deleterEPv")
        monkeypatch.setattr(sys, "meta_path", [FailingImport(error), *sys.meta_path])
    caught = pack_everything_and_record_warnings()
    assert [w.category for w in caught] == [RuntimeWarning], [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert message.startswith(expected), message
    assert "using the Python packer" in message and "--no-build-isolation" in message
    assert packing.backend().name == "python" and packing.backend().reason.startswith(expected)


def _other_release(minor_step: int) -> str:
    """A torch release other than the running one (its minor moved by ``minor_step``)."""
    major, minor, patch = packing._release(torch.__version__)
    return f"{major}.{minor + minor_step}.{patch}"


@pytest.mark.parametrize("recorded_by", ["build_info", "extension"])
@pytest.mark.parametrize("built", [_other_release(1), _other_release(-1) + "+cu117"])
def test_extension_for_another_torch_falls_back_with_a_warning_naming_both(undecided, monkeypatch, recorded_by, built):
    """The torch _C was built against is read from _build_info.py before loading _C, or from _C itself."""
    if recorded_by == "build_info":
        monkeypatch.setitem(sys.modules, "jomed_fast._build_info", build_info(built))
    else:
        monkeypatch.setitem(sys.modules, "jomed_fast._build_info", None)
    monkeypatch.setitem(sys.modules, "jomed_fast._C", fake_extension(built))  # packing with it would fail
    caught = pack_everything_and_record_warnings()
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert message.startswith(
        f"jomed_fast._C was built against torch {built}, this is torch {torch.__version__}: using the Python packer"
    ), message
    assert packing.backend() == Backend(
        "python", f"jomed_fast._C was built against torch {built}, this is torch {torch.__version__}"
    )


def test_extension_for_this_torch_is_used(undecided, monkeypatch):
    """The same checks let a matching extension through: the local label (+cpu) does not count."""
    release = ".".join(map(str, packing._release(torch.__version__)))
    monkeypatch.setitem(sys.modules, "jomed_fast._build_info", build_info(f"{release}+cu126"))
    monkeypatch.setitem(sys.modules, "jomed_fast._C", fake_extension(release))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert packing.backend() == Backend("c++", f"jomed_fast._C, built against torch {release}+cu126")
    with pytest.raises(AssertionError, match=f"the extension built against torch {release} was asked to pack"):
        pack_candidates_batch([QueryCandidates(**good_query())], pad_token_id=0)


def test_release_compares_major_minor_patch():
    assert packing._release("2.13.0+cpu") == packing._release("2.13.0") == (2, 13, 0)
    assert packing._release("2.14.0a0+git1234abc") == (2, 14, 0)
    assert packing._release("2.13.1") != packing._release("2.13.0")
