import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from jomed_fast.data.synthetic import SyntheticGenerator
from jomed_fast.index import Index
from jomed_fast.retriever import TinyCLIP

N = 2000


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("ix")
    recs = SyntheticGenerator(index_size=N).index_records(0, N)
    torch.manual_seed(0)
    enc = TinyCLIP.from_captions([r.text for r in recs], width=8, depth=1, dim=32)
    enc.save(d / "enc")
    ix = Index.build(recs, enc, d / "full", batch_size=250, chunk_size=500, progress=False)
    return d, recs, enc, ix


def test_manifest_and_search_matches_float64(setup):
    d, recs, enc, ix = setup
    m = json.loads((d / "full" / "manifest.json").read_text())
    assert m["count"] == N and m["dim"] == 32 and m["dtype"] == "float16"
    ix = Index.open(d / "full", encoder=enc)
    q = enc.encode_images([r.image for r in recs[:20]]).detach()
    for head in ("image", "text"):
        x = torch.from_numpy(np.array(ix.embeddings[head])).double()
        ref = q.half().double() @ x.T
        rs, ri = ref.topk(10, dim=1)
        for backend in ("ops", "faiss"):
            s, i = ix.search(q, 10, head=head, backend=backend)
            torch.testing.assert_close(s.double(), rs, atol=1e-3, rtol=0)
            # ids equal unless near-ties; check the scores of returned ids against the reference
            torch.testing.assert_close(ref.gather(1, i), rs, atol=1e-3, rtol=0)
    s, i = ix.search(q, 10, head="image", backend="faiss", nlist=8, nprobe=8)
    assert i.shape == (20, 10)


def test_faiss_backend_without_faiss_names_the_extras_and_ops_still_searches(setup, monkeypatch):
    from jomed_fast._extras import MissingDependency

    d, recs, enc, _ = setup
    ix = Index.open(d / "full", encoder=enc)
    q = enc.encode_images([r.image for r in recs[:3]]).detach()
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    extras = r"pip install 'jomed_fast\[faiss-cpu\]' or pip install 'jomed_fast\[faiss-gpu\]'"
    for nlist in (None, 4):
        with pytest.raises(MissingDependency, match=rf"backend='faiss' .*needs .*'faiss'.*{extras}"):
            ix.search(q, 5, head="image", backend="faiss", nlist=nlist)
    s, i = ix.search(q, 5, head="image", backend="ops")
    assert i.shape == (3, 5)


def test_open_refuses_corrupt_and_other_encoder(setup, tmp_path):
    d, recs, enc, ix = setup
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(d / "full", bad)
    with open(bad / "text_embeddings.npy", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="text_embeddings.npy"):
        Index.open(bad)
    other = TinyCLIP.from_captions(["x y"], width=8, depth=1, dim=32)
    with pytest.raises(ValueError, match="fingerprint"):
        Index.open(d / "full", encoder=other)
    with pytest.raises(ValueError, match="manifest"):
        Index.open(tmp_path)


SCRIPT = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    from jomed_fast.data.synthetic import SyntheticGenerator
    from jomed_fast.index import Index
    from jomed_fast.retriever import TinyCLIP
    enc = TinyCLIP.load(sys.argv[1])
    recs = SyntheticGenerator(index_size=%d).index_records(0, %d)
    slow = sys.argv[3] == "slow"
    if len(sys.argv) > 4 and sys.argv[4] == "edited":  # the first 1,000 captions edited after the kill
        for r in recs[:1000]:
            r.text += " (edited)"
    orig = enc.encode_texts
    def encode_texts(t):
        if slow: time.sleep(0.3)
        return orig(t)
    enc.encode_texts = encode_texts
    print("start", flush=True)
    Index.build(recs, enc, sys.argv[2], batch_size=250, chunk_size=500, progress=False)
""") % (N, N)


def _killed_after_the_first_chunk(enc_dir, tmp_path):
    """A slow build of the N records SIGKILLed once a chunk is finished: (its script, its out folder)."""
    script = tmp_path / "b.py"
    script.write_text(SCRIPT)
    out = tmp_path / "resumed"
    p = subprocess.Popen([sys.executable, str(script), str(enc_dir), str(out), "slow"])
    deadline = time.time() + 60
    while time.time() < deadline and not list((out / "chunks").glob("*.text.npy")):
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    return script, out


def test_sigkill_resume_identical(setup, tmp_path):
    d, recs, enc, ix = setup
    script, out = _killed_after_the_first_chunk(d / "enc", tmp_path)
    done = sorted((out / "chunks").glob("*.text.npy"))
    assert 1 <= len(done) < N // 500 and not (out / "manifest.json").exists()
    r = subprocess.run([sys.executable, str(script), str(d / "enc"), str(out), "fast"], timeout=80)
    assert r.returncode == 0
    res = Index.open(out, encoder=enc)
    for h in ("image", "text"):
        np.testing.assert_array_equal(np.asarray(res.embeddings[h]), np.asarray(ix.embeddings[h]))
    assert res.manifest["sha256"] == ix.manifest["sha256"]


def test_sigkill_then_edited_captions_resume_matches_a_fresh_build(setup, tmp_path):
    """Killed with >= 1 chunk finished, rerun with 1,000 edited captions: the finished chunks holding
    them are embedded again, so the index equals an uninterrupted build of the edited records."""
    d, recs, enc, _ix = setup
    script, out = _killed_after_the_first_chunk(d / "enc", tmp_path)
    assert (out / "chunks" / "000000.text.npy").exists() and not (out / "manifest.json").exists()
    r = subprocess.run(
        [sys.executable, str(script), str(d / "enc"), str(out), "fast", "edited"],
        timeout=80,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "changed (ids, captions, images or paths) since they were embedded" in r.stderr
    edited = SyntheticGenerator(index_size=N).index_records(0, N)
    for rec in edited[:1000]:
        rec.text += " (edited)"
    fresh = Index.build(edited, enc, tmp_path / "fresh", batch_size=250, chunk_size=500, progress=False)
    res = Index.open(out, encoder=enc)
    assert res.manifest["sha256"] == fresh.manifest["sha256"]
    assert [row["text"] for row in res.records()[:1000]] == [rec.text for rec in edited[:1000]]
