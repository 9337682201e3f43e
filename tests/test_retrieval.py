"""``Retrieval``: per-head top-k over an index equals a float64 brute force, merged text-first, and
turned into the right ``Candidate`` (image, caption, id) objects."""

import numpy as np
import pytest
import torch

from jomed_fast.candidate_retrieval import Retrieval
from jomed_fast.data.synthetic import SyntheticGenerator
from jomed_fast.index import Index
from jomed_fast.retriever import TinyCLIP

N = 300


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("retrieval")
    gen = SyntheticGenerator(index_size=N)
    recs = gen.index_records(0, N)
    torch.manual_seed(0)
    enc = TinyCLIP.from_captions([r.text for r in recs], width=8, depth=1, dim=32)
    ix = Index.build(recs, enc, d / "ix", batch_size=100, chunk_size=150, progress=False)
    queries = [gen.sample("test", i).load_image() for i in range(4)]
    return recs, enc, ix, queries


def test_search_matches_float64_brute_force(setup):
    recs, _enc, ix, _queries = setup
    r = Retrieval(ix, recs)
    # random unit queries: distinct rankings per query, no ties
    q = torch.nn.functional.normalize(torch.randn(4, ix.dim, generator=torch.Generator().manual_seed(0)), dim=1)
    got = r.search(q, k_text=3, k_image=2)
    assert got.ids.shape == (4, 5) and got.heads == [["text"] * 3 + ["image"] * 2] * 4
    q16 = q.to(torch.float16).double()  # the index rounds queries to its storage dtype
    for head, cols, k in (("text", slice(0, 3), 3), ("image", slice(3, 5), 2)):
        x = torch.from_numpy(np.asarray(ix.embeddings[head], dtype=np.float64))
        full = q16 @ x.T
        ref_scores = full.topk(k, dim=1).values
        # duplicate captions give exactly tied rows: compare the scores the returned rows reach
        torch.testing.assert_close(full.gather(1, got.ids[:, cols]), ref_scores, atol=1e-6, rtol=0)
        torch.testing.assert_close(got.scores[:, cols].double(), ref_scores, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(r.embeddings(head, got.ids[:, cols]).double(), x[got.ids[:, cols]])
    for qi in range(4):
        for c, n in zip(got.candidates[qi], got.ids[qi]):
            assert c.id == recs[int(n)].id and c.text == recs[int(n)].text
            assert np.array_equal(np.asarray(c.image), recs[int(n)].load_image())


def test_one_head_only_and_records_from_the_index(setup):
    recs, enc, ix, queries = setup
    with torch.no_grad():
        q = enc.encode_images(queries[:2])
    got = Retrieval(ix, recs).search(q, k_text=0, k_image=7)
    assert got.ids.shape == (2, 7) and set(got.heads[0]) == {"image"}
    # synthetic records carry their image in memory (no path): the index's own JSONL cannot load them
    with pytest.raises(ValueError, match="neither an image nor an image_path"):
        Retrieval(ix).candidate(0)


def test_bad_arguments_are_named(setup):
    recs, _enc, ix, _queries = setup
    with pytest.raises(ValueError, match="records: expected 300"):
        Retrieval(ix, recs[:10])
    with pytest.raises(ValueError, match="records: row 0"):
        Retrieval(ix, recs[1:] + recs[:1])
    r = Retrieval(ix, recs)
    with pytest.raises(ValueError, match="k_text, k_image"):
        r.search(torch.zeros(1, 32), 0, 0)
    with pytest.raises(ValueError, match="row:"):
        r.candidate(N)
    with pytest.raises(ValueError, match="head:"):
        r.embeddings("caption", torch.zeros(1, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"query_embeddings: expected a \[Q, D\] tensor or a mapping .* got \['text'\]"):
        r.search({"text": torch.zeros(1, 32)})
    with pytest.raises(ValueError, match="query_embeddings: expected as many text as image queries, got 1 and 2"):
        r.search({"text": torch.zeros(1, 32), "image": torch.zeros(2, 32)})


def test_per_head_queries_search_each_head_with_its_own(setup):
    recs, _enc, ix, _queries = setup
    g = torch.Generator().manual_seed(1)
    qt, qi = (torch.nn.functional.normalize(torch.randn(3, ix.dim, generator=g), dim=1) for _ in range(2))
    r = Retrieval(ix, recs)
    got = r.search({"text": qt, "image": qi}, k_text=2, k_image=3)
    assert torch.equal(got.ids[:, :2], r.search(qt, k_text=2, k_image=0).ids)
    assert torch.equal(got.ids[:, 2:], r.search(qi, k_text=0, k_image=3).ids)
    assert torch.equal(got.scores[:, 2:], r.search(qi, k_text=0, k_image=3).scores)
