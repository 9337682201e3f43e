"""The scorer's stages one at a time, without running the decoder: the pack stage's distinct
prefixes, the positions a chunk passes (against transformers' own ``get_rope_index`` /
1-D positions of the full prompt followed by each class-trie path), and the chunk plan's budget
(trie nodes and the training byte model counted), for every tiny family (Qwen2.5-VL's M-RoPE
against ``Qwen2_5_VLModel.get_rope_index``). ``test_scorer`` / ``test_scorer_families`` check the
stages together against the unmodified Hugging Face models."""

import numpy as np
import pytest
import torch
from PIL import Image

from jomed_fast.readers import load_reader, tiny
from jomed_fast.scoring import Candidate, CandidateScorer
from jomed_fast.scoring.batch import SuffixRows, pack
from jomed_fast.scoring.inputs import normalize_inputs
from jomed_fast.tasks import Task, get_task

pytestmark = pytest.mark.usefixtures("one_thread")

SINGLE = get_task("synthetic")
MULTI = Task(
    name="multi_token",
    kind="multiclass",
    labels=("benign", "malignant", "10", "1", "normal"),
    question="What is the finding?",
    instructions="Answer benign, malignant, normal, 1 or 10.\n",
)


def _image(h, w, seed):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def readers(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    out = {}
    for arch in tiny.ALL_ARCHS:
        reader = load_reader(tiny.build(arch, root / arch), device="cpu")
        for p in reader.model.parameters():
            p.requires_grad_(False)
        out[arch] = reader
    return out


def _packing(scorer, qimgs, questions, cands):
    images, qs, cs, _, _ = normalize_inputs(scorer.task, qimgs, questions, cands)
    return pack(scorer.reader.processor, scorer.split_prompts(images, qs, cs), images)


@pytest.mark.parametrize("arch", tiny.ALL_ARCHS)
def test_pack_numbers_distinct_prefixes_and_images(readers, arch):
    reader = readers[arch]
    q0, q1, shared = _image(40, 40, 1), _image(56, 28, 2), _image(28, 28, 3)
    cands = [
        [Candidate(shared, "a"), Candidate(None, "b")],
        [Candidate(_image(28, 42, 4), "c"), Candidate(shared, "d")],
        [Candidate(None, "e"), Candidate(shared, "f")],
        [Candidate(None, "g"), Candidate(None, "h")],
    ]
    # queries 0 and 2: the same image object and question; query 3: another image of q0's size (same tokens)
    qimgs = [q0, q1, q0, _image(40, 40, 9)]
    # paper: the template's system part. LLaVA's "USER: " keeps its space as a token of its own before
    # an image but joins it to the next word before text, so query 1 (every candidate an image) shares
    # one token more: a prefix of its own
    paper = ([0, 1, 0, 0], [0, 1]) if arch == "llava" else ([0, 0, 0, 0], [0])
    for layout, prefix_of, first in (("shared_query", [0, 1, 0, 2], [0, 1, 3]), ("paper", *paper)):
        p = _packing(CandidateScorer(reader, SINGLE, layout), qimgs, None, cands)
        assert p.prefix_of.tolist() == prefix_of and p.first_query == first
        assert len(p.table) == 5  # 3 query images, shared, the one other candidate image
        assert [len(u) for u in p.row_uids] == (
            [1, 0, 1, 1, 0, 1, 0, 0] if layout == "shared_query" else [2, 1, 2, 2, 1, 2, 1, 1]
        )
        assert all(p.table.uid(shared) in p.row_uids[r] for r in (0, 3, 5))  # the shared record: one uid


def _trie_paths(head):
    """Each node's token path from the trie's root: its ancestors' tokens by depth."""
    anc, tokens, depths = head.node_ancestors.cpu(), head.node_tokens.cpu(), head.node_depths.cpu()
    return [
        [int(tokens[i]) for i in sorted(torch.nonzero(anc[j]).flatten().tolist(), key=lambda i: int(depths[i]))]
        for j in range(anc.shape[0])
    ]


def _positions(reader, table, ids, uids):
    """What transformers numbers the whole sequence ``ids`` (images ``uids`` in order): ``[3, T]`` / ``[T]``."""
    if not hasattr(reader.hf_model.model, "get_rope_index"):  # the model's own say, not the reader's
        return torch.arange(len(ids))
    seq = torch.tensor([ids])
    grids = table.grids(uids)
    pos, _ = reader.hf_model.model.get_rope_index(
        seq,
        reader.processor.mm_token_type_ids(seq),
        image_grid_thw=grids if len(uids) else None,
        attention_mask=torch.ones_like(seq),
    )
    return pos[:, 0]


@pytest.mark.parametrize("layout", ["shared_query", "paper"])
@pytest.mark.parametrize("arch", tiny.ALL_ARCHS)
def test_chunk_positions_are_the_full_prompts_positions(readers, arch, layout):
    reader = readers[arch]
    scorer = CandidateScorer(reader, MULTI, layout)
    assert scorer.head.num_nodes > 1
    qimgs = [_image(56, 56, 5), None]  # square images (2x2 tokens): M-RoPE positions run short of 1-D ones
    cands = [
        [Candidate(_image(56, 56, 6), "a small round cyst"), Candidate(None, "")],
        [Candidate(_image(56, 112, 7), "x"), None],
    ]
    packing = _packing(scorer, qimgs, None, cands)
    rows = SuffixRows.from_packing(packing)
    mrope = hasattr(reader.hf_model.model, "get_rope_index")
    assert rows.rope_deltas is None if not mrope else (rows.rope_deltas < 0).sum() >= 2
    R, L = rows.ids.shape
    got = rows.chunk_positions(torch.arange(R), L, scorer.head.node_depths, "cpu")
    paths = _trie_paths(scorer.head)
    K = len(cands[0])
    for r in range(R):
        b, P, n = r // K, int(rows.prefix_lengths[r]), int(rows.lengths[r])
        prompt = packing.batch.prefix_input_ids[b, :P].tolist() + rows.ids[r, :n].tolist()
        uids = packing.prefix_uids[b] + packing.row_uids[r]
        for j, path in enumerate(paths):
            want = _positions(reader, packing.table, prompt + path, uids)  # [3, T] or [T]
            if j == 0:  # the prompt: the prefix's positions, then the row's own suffix slots
                assert torch.equal(packing.prefix_positions([b], "cpu")[..., 0, :P], want[..., :P])
                assert torch.equal(got[..., r, :n], want[..., P : P + n])
            assert torch.equal(got[..., r, L + j], want[..., -1]), (r, j)  # the node: its token's position


@pytest.mark.parametrize("arch", tiny.ALL_ARCHS)
def test_chunk_plan_counts_trie_nodes_prefix_and_training_bytes(readers, arch):
    scorer = CandidateScorer(readers[arch], MULTI, "shared_query", forward_overhead=float("inf"))
    cost, N, n, P = scorer.cost, scorer.head.num_nodes, 2, 300
    budget = 3 * cost.row_bytes(n + N, P)
    assert cost.rows(budget, n + N, P) == 3
    assert cost.rows(budget, n, P) > 3 and cost.rows(budget, n + N, 0) > 3  # without nodes or prefix: more rows
    chunks = scorer.chunk_plan(torch.full((7,), n), P, budget, grad=False)
    assert [c.tolist() for c in chunks] == [[0], [1, 2, 3], [4, 5, 6]]  # fewest forwards; ties: longer last runs
    trained = scorer.chunk_plan(torch.full((7,), n), P, budget, grad=True)  # autograd keeps every layer's activations
    assert len(trained) > len(chunks) and max(len(c) for c in trained) == cost.rows(budget, n + N, P, grad=True)
    lengths = torch.tensor([9, 2, 30, 2, 9, 2, 30])
    for overhead in (0.0, None, float("inf")):
        s = CandidateScorer(readers[arch], MULTI, "shared_query", forward_overhead=overhead)
        plan = s.chunk_plan(lengths, P, budget, grad=False)
        assert sorted(int(r) for c in plan for r in c) == list(range(7))
        for c in plan:  # each chunk within the budget at its own padded length, nodes included
            assert len(c) <= cost.rows(budget, int(lengths[c].max()) + N, P)
        if overhead == 0.0:  # free forwards: one length per chunk
            assert all(len(set(lengths[c].tolist())) == 1 for c in plan)
