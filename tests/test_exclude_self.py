"""Leave-self-out retrieval: a query never gets its own index record back (same id, same image
file bytes under another id, same in-memory pixels, or a near duplicate when asked), the count of
rows left out is right, ``exclude_self=False`` brings them back, and the top-K equals a float64
brute force that filters the excluded rows first and ranks the rest."""

import shutil

import numpy as np
import pytest
import torch

from jomed_fast.candidate_retrieval import Retrieval
from jomed_fast.data import IndexRecord, Sample, load_index_records, write_index_records
from jomed_fast.data.synthetic import SyntheticGenerator
from jomed_fast.index import Index
from jomed_fast.retriever import TinyCLIP
from jomed_fast.train.reader_data import retrieve_candidates

N = 40
TWIN = 3  # the index holds row TWIN's image file twice: rows TWIN and N (a copy under another id)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("exclude_self")
    gen = SyntheticGenerator(index_size=N)
    write_index_records(gen.index_records(0, N), d / "index.jsonl", images_dir=d / "images")
    recs = list(load_index_records(d / "index.jsonl"))
    shutil.copyfile(recs[TWIN].image_path, d / "images" / "twin.png")
    recs.append(IndexRecord(id="twin", image_path=str(d / "images" / "twin.png"), text=recs[TWIN].text))
    torch.manual_seed(0)
    enc = TinyCLIP.from_captions([r.text for r in recs], width=8, depth=1, dim=32)
    ix = Index.build(recs, enc, d / "ix", batch_size=64, chunk_size=64, progress=False)
    return recs, enc, ix


def _embed(enc, images) -> torch.Tensor:
    with torch.no_grad():
        return enc.encode_images(images)


def _sample(sid, image_path=None, image=None) -> Sample:
    return Sample(id=sid, image_path=image_path, answer="normal", label=0, image=image)


def _brute_force(ix, q, head, k, excluded_rows):
    """float64 scores of the fp16-rounded queries, the excluded rows set to -inf, then the top k."""
    x = torch.from_numpy(np.asarray(ix.embeddings[head], dtype=np.float64))
    full = q.to(torch.float16).double() @ x.T
    for j, rows in enumerate(excluded_rows):
        full[j, list(rows)] = -torch.inf
    return full, full.topk(k, dim=1)


def test_the_querys_own_id_never_comes_back_and_k_stays_k(setup):
    recs, enc, ix = setup
    n = ix.count
    other = recs[7].load_image()[::-1].copy()  # another picture: only the id says it is row 11
    query = _sample(recs[11].id, image=other)
    q = _embed(enc, [recs[11].load_image()])  # embedded like row 11 itself, so it would rank first
    r = Retrieval(ix)
    got = r.search(q, k_text=n - 1, k_image=n - 1, queries=[query])
    assert got.ids.shape == (1, 2 * (n - 1))
    for head in (slice(0, n - 1), slice(n - 1, None)):
        assert sorted(got.ids[0, head].tolist()) == [m for m in range(n) if m != 11]  # all but its own
    assert got.excluded.tolist() == [1]
    assert r.excluded.to_dict() == {
        "records": 1,
        "by_id": 1,
        "by_image": 0,
        "near_duplicate": 0,
        "queries": 1,
        "queries_with_exclusions": 1,
    }
    back = Retrieval(ix, exclude_self=False).search(q, k_text=0, k_image=1, queries=[query])
    assert back.ids.tolist() == [[11]] and back.excluded.tolist() == [0]  # off: its own record is top-1


def test_the_same_image_file_under_another_id_is_left_out_with_its_copy(setup):
    recs, enc, ix = setup
    query = _sample("a-training-query", image_path=recs[TWIN].image_path)
    q = _embed(enc, [recs[TWIN].load_image()])
    r = Retrieval(ix)
    got = r.search(q, k_text=2, k_image=ix.count - 2, queries=[query])
    assert TWIN not in got.ids[0].tolist() and N not in got.ids[0].tolist()
    assert got.ids.shape == (1, ix.count) and got.excluded.tolist() == [2]
    assert r.excluded.by_image == 2 and r.excluded.by_id == 0
    plain = Retrieval(ix, exclude_self=False).search(q, k_text=0, k_image=ix.count, queries=[query])
    assert {TWIN, N} <= set(plain.ids[0].tolist()) and plain.excluded.tolist() == [0]


def test_in_memory_pixels_match_an_index_built_from_pixels(tmp_path):
    gen = SyntheticGenerator(index_size=12)
    recs = gen.index_records(0, 12)  # images held in memory: the index stores pixels_sha256
    torch.manual_seed(1)
    enc = TinyCLIP.from_captions([r.text for r in recs], width=8, depth=1, dim=16)
    ix = Index.build(recs, enc, tmp_path / "ix", progress=False)
    assert "pixels_sha256" in ix.records()[0]
    query = _sample("q", image=recs[5].load_image().copy())
    r = Retrieval(ix, recs)
    got = r.search(_embed(enc, [query.image]), k_text=11, k_image=11, queries=[query])
    assert 5 not in got.ids[0].tolist() and got.excluded.tolist() == [1] and r.excluded.by_image == 1
    kept = Retrieval(ix, recs, exclude_self=False).search(_embed(enc, [query.image]), 0, 12, queries=[query])
    assert 5 in kept.ids[0].tolist()


def test_near_duplicates_are_left_out_only_when_asked(setup):
    recs, enc, ix = setup
    image = recs[20].load_image().astype(np.int16)
    image[::4, ::4] += 1  # another file's bytes and other pixels: no digest matches
    query = _sample("a-rescan", image=np.clip(image, 0, 255).astype(np.uint8))
    q = _embed(enc, [query.image])
    x = torch.from_numpy(np.asarray(ix.embeddings["image"], dtype=np.float64))
    cos = (torch.nn.functional.normalize(q.double(), dim=1).to(torch.float16).double() @ x.T)[0]
    theta = float(cos[20]) - 1e-3
    want = set(torch.nonzero(cos >= theta).flatten().tolist())
    assert 20 in want and len(want) < ix.count  # the threshold keeps the rescan's original and not all
    off = Retrieval(ix).search(q, k_text=0, k_image=ix.count, queries=[query])
    assert off.excluded.tolist() == [0] and 20 in off.ids[0].tolist()
    r = Retrieval(ix, near_duplicate=theta)
    k = ix.count - len(want)
    got = r.search(q, k_text=k, k_image=k, queries=[query])
    assert set(got.ids[0].tolist()) == set(range(ix.count)) - want and got.excluded.tolist() == [len(want)]
    assert r.excluded.near_duplicate == len(want) and r.excluded.by_id == r.excluded.by_image == 0
    with pytest.raises(ValueError, match=r"k_text: expected at most"):
        r.search(q, k_text=k + 1, k_image=0, queries=[query])


def test_top_k_is_the_filter_then_rank_brute_force(setup):
    recs, enc, ix = setup
    # queries that are index records (ids 0..5) and one that is not; random unit embeddings, so the
    # ranking is the embeddings' and the excluded rows sit anywhere in it
    queries = [_sample(recs[j].id, image_path=recs[j].image_path) for j in (0, 2, TWIN, 5)] + [_sample("new")]
    own = [{0}, {2}, {TWIN, N}, {5}, set()]
    q = torch.nn.functional.normalize(torch.randn(5, ix.dim, generator=torch.Generator().manual_seed(3)), dim=1)
    r = Retrieval(ix)
    got = r.search(q, k_text=6, k_image=4, queries=queries)
    assert got.excluded.tolist() == [len(s) for s in own]
    for head, cols, k in (("text", slice(0, 6), 6), ("image", slice(6, 10), 4)):
        full, (ref_scores, _) = _brute_force(ix, q, head, k, own)
        ids = got.ids[:, cols]
        for j in range(5):
            assert not own[j] & set(ids[j].tolist())
        torch.testing.assert_close(full.gather(1, ids), ref_scores, atol=1e-6, rtol=0)  # ties: scores reached
        torch.testing.assert_close(got.scores[:, cols].double(), ref_scores, atol=1e-3, rtol=1e-3)
    unfiltered = Retrieval(ix, exclude_self=False).search(q, k_text=6, k_image=4, queries=queries)
    full, (ref_scores, _) = _brute_force(ix, q, "text", 6, [set()] * 5)
    torch.testing.assert_close(full.gather(1, unfiltered.ids[:, :6]), ref_scores, atol=1e-6, rtol=0)


def test_stage_one_retrieval_leaves_the_training_samples_out(setup):
    recs, enc, ix = setup
    samples = [_sample(recs[j].id, image_path=recs[j].image_path) for j in range(6)]
    cands, ids, excluded = retrieve_candidates(samples, Retrieval(ix), enc, 2, 2)
    assert excluded.tolist() == [1, 1, 1, 2, 1, 1]  # TWIN's image is in the index twice
    for j, row in enumerate(ids.tolist()):
        assert j not in row and all(c.id != recs[j].id for c in cands[j]) and len(row) == 4
    _, ids_off, excluded_off = retrieve_candidates(samples, Retrieval(ix, exclude_self=False), enc, 0, ix.count)
    assert excluded_off.tolist() == [0] * 6 and all(j in row for j, row in enumerate(ids_off.tolist()))
    # off, each sample's own record is its image-head top-1, up to the fp16 rounding of near ties
    x = torch.from_numpy(np.asarray(ix.embeddings["image"], dtype=np.float64))
    q = _embed(enc, [s.load_image() for s in samples]).to(torch.float16).double()
    top1 = (q * x[ids_off[:, 0]]).sum(1)
    torch.testing.assert_close(top1, (q * x[:6]).sum(1), atol=1e-3, rtol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"near_duplicate": 0.0}, r"near_duplicate: expected a cosine in \(0, 1\] or None, got 0.0"),
        ({"near_duplicate": 1.5}, r"near_duplicate: expected a cosine in \(0, 1\] or None, got 1.5"),
        ({"exclude_self": "yes"}, r"exclude_self: expected a bool, got 'yes'"),
    ],
)
def test_bad_options_are_named(setup, kwargs, message):
    _recs, _enc, ix = setup
    with pytest.raises(ValueError, match=message):
        Retrieval(ix, **kwargs)


def test_queries_must_match_the_embeddings(setup):
    recs, enc, ix = setup
    q = _embed(enc, [recs[0].load_image()])
    with pytest.raises(ValueError, match=r"queries: expected one record per query embedding \(1\), got 2"):
        Retrieval(ix).search(q, 1, 1, queries=[_sample("a"), _sample("b")])


@pytest.fixture(scope="module")
def own_records(tmp_path_factory):
    """An index that holds the queries themselves (their ids and pixels) beside other records, a
    tiny reader's scorer and the index's encoder."""
    from jomed_fast.readers import load_reader, tiny
    from jomed_fast.scoring import CandidateScorer

    root = tmp_path_factory.mktemp("own_records")
    gen = SyntheticGenerator(index_size=16, image_size=32)
    samples = [gen.sample("train", i) for i in range(6)]
    recs = gen.index_records(0, 16) + [IndexRecord(s.id, None, "a case like this one", s.load_image()) for s in samples]
    torch.manual_seed(0)
    enc = TinyCLIP.from_captions([r.text for r in recs], width=8, depth=1, dim=16)
    ix = Index.build(recs, enc, root / "ix", progress=False)
    reader = load_reader(tiny.build("qwen2_vl", root / "reader"), device="cpu")
    reader.model.requires_grad_(False)
    return samples, recs, ix, enc, reader, CandidateScorer(reader, "synthetic", "paper")


def test_predict_never_shows_a_query_its_own_record(own_records):
    from jomed_fast.infer import InferConfig, predict, predict_identity

    samples, recs, ix, enc, _reader, scorer = own_records
    config = InferConfig(k_text=2, k_image=2)
    retrieval = Retrieval(ix, recs)
    got = predict(scorer, samples, retrieval=retrieval, encoder=enc, config=config, progress=False)
    for s, r in zip(samples, got):
        assert len(r.candidates) == 4 and all(c.id != s.id for c in r.candidates)
    assert retrieval.excluded.records == len(samples) and retrieval.excluded.by_id == len(samples)
    plain = Retrieval(ix, recs, exclude_self=False)
    back = predict(scorer, samples, retrieval=plain, encoder=enc, config=config, progress=False)
    # off: the image head brings each query's own record (its very pixels) back, in its top 2 (the
    # tiny encoder ties some images)
    assert all(s.id in {c.id for c in r.candidates[2:]} for s, r in zip(samples, back))
    ids = [predict_identity(scorer, samples, retrieval=x, encoder=enc, config=config) for x in (retrieval, plain)]
    assert ids[0]["exclusion"] != ids[1]["exclusion"]  # a predictions file resumes only with the same rule


def test_stage_two_never_scores_a_query_against_its_own_record(own_records, tmp_path, monkeypatch):
    from jomed_fast.retriever import QueryEncoder
    from jomed_fast.train.retriever import RetrieverTrainConfig, train_retriever

    samples, recs, ix, enc, reader, _scorer = own_records
    retrieval = Retrieval(ix, recs)
    seen = []
    search = retrieval.search

    def spy(*args, **kwargs):
        got = search(*args, **kwargs)
        seen.append((kwargs.get("queries"), got))
        return got

    monkeypatch.setattr(retrieval, "search", spy)
    cfg = RetrieverTrainConfig(k=4, batch_size=3, max_steps=2, refresh_every=None, alpha=None, head="image")
    import copy

    query = QueryEncoder(copy.deepcopy(enc), cfg.n_trainable, cfg.alpha)
    train_retriever(cfg, reader, "synthetic", query, retrieval, samples, None, tmp_path / "run", progress=False)
    assert seen and all(q is not None for q, _ in seen)
    for queries, got in seen:
        for s, row in zip(queries, got.candidates):
            assert len(row) in (cfg.k, cfg.select_k) and all(c.id != s.id for c in row)
    assert retrieval.excluded.by_id == sum(len(q) for q, _ in seen)


def test_random_rows_draw_uniformly_around_the_own_rows():
    from jomed_fast.infer.predict import random_rows

    g = torch.Generator().manual_seed(0)
    draws = random_rows(7, [5, 1, 1], 70_000, g)
    counts = torch.bincount(draws, minlength=7)
    assert counts[1] == counts[5] == 0
    allowed = counts[[0, 2, 3, 4, 6]].double() / 70_000
    assert float((allowed - 0.2).abs().max()) < 0.01  # five rows, 1/5 each (binomial sd 0.0015)
    assert random_rows(3, [], 4, torch.Generator().manual_seed(1)).tolist() == (
        torch.randint(3, (4,), generator=torch.Generator().manual_seed(1)).tolist()
    )  # nothing to avoid: the plain uniform draw
    with pytest.raises(ValueError, match=r"retrieval: every one of the index's 2 records is the query itself"):
        random_rows(2, [0, 1], 1, g)


def test_random_retrieval_never_draws_a_querys_own_record(own_records):
    from jomed_fast.infer import InferConfig, predict, predict_identity

    samples, recs, ix, enc, _reader, scorer = own_records
    # k large beside the 22-record index: a draw that ignored the exclusion would hit each query's own
    # record (1 row of 22) with probability 1 - (21/22)^60 > 0.9 per query
    config = InferConfig(retrieval="random_records", k_text=30, k_image=30, seed=4)
    retrieval = Retrieval(ix, recs)
    got = predict(scorer, samples, retrieval=retrieval, config=config, progress=False)
    for s, r in zip(samples, got):
        assert len(r.candidates) == 60 and all(c.id != s.id for c in r.candidates)
    assert retrieval.excluded.by_id == len(samples)
    plain = Retrieval(ix, recs, exclude_self=False)
    back = predict(scorer, samples, retrieval=plain, config=config, progress=False)
    assert sum(s.id in {c.id for c in r.candidates} for s, r in zip(samples, back)) >= len(samples) - 1
    ids = [predict_identity(scorer, samples, retrieval=x, config=config) for x in (retrieval, plain)]
    assert ids[0]["exclusion"] != ids[1]["exclusion"]
