"""Sharded index build over torch.distributed (2 CPU processes, gloo) vs a single-process build.

Each rank is a ``python -m jomed_fast.index build-synthetic`` process (run through ``main``) with
the environment torchrun would give it (RANK, WORLD_SIZE, MASTER_ADDR/PORT on a free port).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from jomed_fast.index import Index, build_synthetic_index, synthetic_encoder

N, CHUNK = 2000, 250

# argv: out_dir encoder_dir mode [chunk_size]; mode: slow (sleep per chunk) | fast | fail (rank 1 raises)
SCRIPT = textwrap.dedent("""
    import os, sys, time
    from jomed_fast.index.__main__ import main
    from jomed_fast.retriever.tiny_clip import TinyCLIP
    out, enc, mode = sys.argv[1:4]
    chunk = sys.argv[4] if len(sys.argv) > 4 else "%d"
    rows = [0]
    orig = TinyCLIP.encode_texts
    def encode_texts(self, texts):
        if mode == "slow":
            time.sleep(0.4)
        if mode == "fail" and os.environ["RANK"] == "1":
            raise ValueError("records: expected an encodable caption, got a test failure")
        rows[0] += len(texts)
        return orig(self, texts)
    TinyCLIP.encode_texts = encode_texts
    rc = main(["build-synthetic", "--records", "%d", "--out", out, "--encoder", enc, "--chunk-size", chunk,
               "--batch-size", "%d", "--threads", "1", "--no-progress"])
    print("encoded", rows[0], flush=True)
    sys.exit(rc)
""") % (CHUNK, N, CHUNK)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script, out, enc, mode, chunks=(CHUNK, CHUNK)):
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), str(out), str(enc), mode, str(chunks[rank])],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def _finish(procs, timeout=90):
    res = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("a rank hung (did not finish within the timeout)") from None
        res.append((p.returncode, o, e))
    return res


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("ixd")
    torch.manual_seed(0)
    enc = synthetic_encoder(width=8, depth=1, dim=32)
    enc.save(d / "enc")
    ref = build_synthetic_index(
        N, enc, d / "single", batch_size=CHUNK, chunk_size=CHUNK, progress=False, distributed=False
    )
    script = d / "rank.py"
    script.write_text(SCRIPT)
    return d, enc, ref, script


def test_two_ranks_killed_resumed_identical_to_single_process(setup, tmp_path):
    d, enc, ref, script = setup
    out = tmp_path / "dist"
    procs = _launch(script, out, d / "enc", "slow")
    deadline = time.time() + 60
    while time.time() < deadline and not list((out / "chunks").glob("*.text.npy")):
        time.sleep(0.05)
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)
    for p in procs:
        p.communicate()
    done = len(list((out / "chunks").glob("*.text.npy")))
    assert 1 <= done < N // CHUNK and not (out / "manifest.json").exists()

    res = _finish(_launch(script, out, d / "enc", "fast"))
    assert [r[0] for r in res] == [0, 0], [r[2][-2000:] for r in res]
    # the rerun skipped the finished chunks: the two ranks together embedded only the others
    encoded = [int(r[1].split("encoded ")[1].split()[0]) for r in res]
    assert sum(encoded) == N - done * CHUNK and min(encoded) > 0
    summary = json.loads(res[0][1].splitlines()[0])  # rank 0 prints the build summary
    assert summary["world"] == 2 and summary["count"] == N
    got = Index.open(out, encoder=enc)
    # byte-identical to the single-process build: same sha256 of every file (embeddings, records)
    assert got.manifest["sha256"] == ref.manifest["sha256"]
    assert got.manifest == ref.manifest
    assert not (out / "chunks").exists() and not (out / "build_progress.json").exists()


def test_ranks_fail_together(setup, tmp_path):
    d, script = setup[0], setup[3]
    # different settings on the two ranks: both refuse, naming the setting and the odd rank
    res = _finish(_launch(script, tmp_path / "mismatch", d / "enc", "fast", chunks=(CHUNK, 2 * CHUNK)))
    assert [r[0] for r in res] == [2, 2]
    for _, _, err in res:
        assert "chunk_size" in err and "rank(s) [1]" in err
    # rank 1 raises while embedding: it reports its error, rank 0 stops too instead of hanging
    res = _finish(_launch(script, tmp_path / "fail", d / "enc", "fail"))
    assert [r[0] for r in res] == [2, 2]
    assert "records: expected an encodable caption" in res[1][2]
    assert "failed on another rank" in res[0][2]
    assert not (tmp_path / "fail" / "manifest.json").exists()


def test_distributed_true_needs_a_process_group(setup, tmp_path):
    enc = setup[1]
    with pytest.raises(ValueError, match="distributed: expected an initialised"):
        build_synthetic_index(10, enc, tmp_path / "x", distributed=True, progress=False)
    with pytest.raises(TypeError, match="distributed"):
        build_synthetic_index(10, enc, tmp_path / "x", distributed="yes", progress=False)
