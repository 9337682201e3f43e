"""Index at scale on CPU: build N synthetic records, SIGKILL midway, resume, verify, search vs float64.

    python bench/index_scale.py [--records 100000] [--chunk-size 4096] [--threads 1] [--queries 256]
                                [--distributed 0] [--work DIR] [--json PATH]

Steps, each timed (wall clock), all through the CLI ``python -m jomed_fast.index build-synthetic``
with the same saved encoder (a deterministic untrained TinyCLIP, ``--width/--depth/--dim``):

1. ``reference``: one uninterrupted single-process build of N records.
2. ``killed``: the same command in another directory, SIGKILLed as soon as half of the
   ``ceil(N / chunk_size)`` chunks are finished; ``resumed``: the same command again, which skips
   the finished chunks. The resumed files must be byte-identical to the reference (sha256).
3. ``verify``: ``Index.open`` with the encoder (sha256 of every file, shapes, fingerprint).
The encoder is first pre-trained (``--pretrain`` records, 3 epochs of the CLIP loss) so that
its embeddings spread out; an untrained tower maps every input to nearly the same direction and
the search check would be all ties.

4. ``search``: Q query images (synthetic test samples, encoded by the same encoder) against both
   heads, k = 10, with ``backend="ops"`` and faiss ``IndexFlatIP``, compared with a float64 brute
   force :math:`\\operatorname{top-k}_n \\mathrm{fp16}(q) \\cdot X_n` (stable sort: ties by the lower
   id). ``match``: in every row, k distinct ids whose reference scores equal the reference top-k
   within 1e-6; and identical ids in every row whose top-(k+1) reference scores are all more than
   1e-6 apart (rows with ties, e.g. duplicate captions in the text head, are judged by their
   scores only: faiss does not promise a tie order). ``ids_equal_rows`` is the fraction of rows
   with identical ids, ties included (``ops`` breaks ties by the lower id, like the reference).
   Plus tie-aware IVF recall@k (``nlist`` = 4 sqrt(N), ``nprobe`` 8 and 32).
5. optional ``--distributed W``: the same build under ``torchrun --nproc-per-node W`` (gloo);
   byte-identical to the reference.

Writes ``bench/results/index_scale.json`` (atomically). Times depend on the machine's load; the
JSON records the CPU count, the threads per process and the load average at the start.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _harness as H  # noqa: E402


def _cli(n: int, out: Path, a, enc_dir: Path) -> list[str]:
    return [
        "-m",
        "jomed_fast.index",
        "build-synthetic",
        "--records",
        str(n),
        "--out",
        str(out),
        "--chunk-size",
        str(a.chunk_size),
        "--batch-size",
        str(a.batch_size),
        "--threads",
        str(a.threads),
        "--encoder",
        str(enc_dir),
        "--no-progress",
    ]


def _run(cmd: list[str], timeout: float) -> float:
    """Seconds (wall) the command took; raises if it failed."""
    run = lambda: subprocess.run(cmd, check=True, timeout=timeout, stdout=subprocess.DEVNULL)  # noqa: E731
    return H.time_call(run)[1].seconds


def _start_then_kill(cmd: list[str], out: Path, target: int) -> None:
    """Start ``cmd`` and SIGKILL it as soon as ``target`` chunks of ``out`` are finished."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    while p.poll() is None:
        done = list((out / "chunks").glob("*.text.npy")) if (out / "chunks").is_dir() else []
        if len(done) >= target:
            break
        time.sleep(0.05)
    if p.poll() is not None:
        raise RuntimeError("the build finished before it could be killed; use a smaller --chunk-size")
    os.kill(p.pid, signal.SIGKILL)
    p.wait()


def _build_killed_then_resumed(a, enc_dir: Path, out: Path, n_chunks: int) -> dict:
    """Start a build, SIGKILL it once half the chunks are done, resume it; times and chunk counts."""
    cmd = [sys.executable, *_cli(a.records, out, a, enc_dir)]
    killed_s = H.time_call(lambda: _start_then_kill(cmd, out, max(1, n_chunks // 2)))[1].seconds
    finished = len(list((out / "chunks").glob("*.text.npy")))
    if (out / "manifest.json").exists():
        raise RuntimeError("a manifest exists after the kill: the kill came too late")
    resumed_s = _run(cmd, a.timeout)
    return {
        "killed_after_s": round(killed_s, 3),
        "chunks_finished_at_kill": finished,
        "chunks": n_chunks,
        "resumed_s": round(resumed_s, 3),
        "killed_plus_resumed_s": round(killed_s + resumed_s, 3),
    }


def _reference_topk(q: torch.Tensor, x64: torch.Tensor, k: int):
    """The float64 brute force ``fp16(q) · X``: all scores ``[Q, N]`` and the top-(k+1) scores and
    ids of each row (a stable sort: ties by the lower id)."""
    ref = q.half().double() @ x64.T
    rs, ri = torch.sort(ref, dim=1, descending=True, stable=True)
    return ref, rs[:, : k + 1], ri[:, : k + 1]


def _exact_check(ix, q, head: str, backend: str, k: int, eps: float, ref, rs, ri, unambiguous) -> dict:
    """One exact backend against the reference: scores, distinct ids, ids where no row has ties."""
    ix.search(q[:1], k, head=head, backend=backend)  # build/warm the backend
    (_, i), t = H.time_call(lambda: ix.search(q, k, head=head, backend=backend))
    got = ref.gather(1, i).sort(dim=1, descending=True).values
    score_err = float((got - rs[:, :k]).abs().max())
    distinct = all(len(set(r)) == k for r in i.tolist())
    same_ids = bool(torch.equal(i[unambiguous], ri[unambiguous, :k]))
    return {
        "search_s": round(t.seconds, 4),
        "max_score_error": score_err,
        "ids_equal_rows": float((i == ri[:, :k]).all(dim=1).float().mean()),
        "ids_equal_where_unambiguous": same_ids,
        "match": distinct and score_err <= eps and same_ids,
    }


def _ivf_check(ix, q, head: str, k: int, eps: float, ref, rs) -> dict:
    """faiss IVF (``nlist="auto"``): k-means + add time, tie-aware recall@k at nprobe 8 and 32."""
    from jomed_fast.index.cost import default_nlist

    _, t = H.time_call(lambda: ix.search(q[:1], k, head=head, backend="faiss", nlist="auto"))  # cached after
    res = {"nlist": default_nlist(ix.count), "train_add_s": round(t.seconds, 3)}
    kth = rs[:, k - 1 : k]
    for nprobe in (8, 32):
        (_, ii), t = H.time_call(
            lambda nprobe=nprobe: ix.search(q, k, head=head, backend="faiss", nlist="auto", nprobe=nprobe)
        )
        hit = ref.gather(1, ii.clamp(min=0)) >= kth - eps  # tie-aware: any row scoring as high as the k-th
        hit &= ii >= 0
        res[f"nprobe_{nprobe}"] = {"recall_at_k": float(hit.float().mean()), "search_s": round(t.seconds, 4)}
    return res


def _search_check(ix, enc, a) -> dict:
    """Both heads, ops and faiss flat vs the float64 reference; IVF recall (tie-aware)."""
    from jomed_fast.data.synthetic import SyntheticGenerator

    gen = SyntheticGenerator(n_test=a.queries)
    with torch.no_grad():
        q = enc.encode_images([gen.sample("test", i).image for i in range(a.queries)]).float()
    k, eps = 10, 1e-6
    out: dict = {"queries": a.queries, "k": k, "tie_eps": eps}
    for head in ("image", "text"):
        x64 = torch.from_numpy(np.array(ix.embeddings[head])).double()
        (ref, rs, ri), t = H.time_call(lambda x64=x64: _reference_topk(q, x64, k))
        unambiguous = (rs[:, :-1] - rs[:, 1:] > eps).all(dim=1)  # no ties, exact or within eps
        res = {"float64_bruteforce_s": round(t.seconds, 4), "rows_unambiguous": int(unambiguous.sum())}
        for backend in ("ops", "faiss"):
            res[backend] = _exact_check(ix, q, head, backend, k, eps, ref, rs, ri, unambiguous)
        res["ivf"] = _ivf_check(ix, q, head, k, eps, ref, rs)
        out[head] = res
    out["match"] = all(out[h][b]["match"] for h in ("image", "text") for b in ("ops", "faiss"))
    return out


def parse_args(argv=None):
    p = H.arguments(__doc__)
    p.add_argument("--records", type=int, default=100_000, help="synthetic index records N")
    p.add_argument("--chunk-size", type=int, default=4096, help="rows per resumable chunk")
    p.add_argument("--batch-size", type=int, default=512, help="rows per encoder call")
    p.add_argument("--threads", type=int, default=1, help="torch threads per build process")
    p.add_argument("--width", type=int, default=32, help="TinyCLIP conv width")
    p.add_argument("--depth", type=int, default=4, help="TinyCLIP residual blocks")
    p.add_argument("--dim", type=int, default=64, help="embedding dim D")
    p.add_argument(
        "--pretrain",
        type=int,
        default=2000,
        help="contrastive pre-training of the encoder on this many records first (0: untrained)",
    )
    p.add_argument("--queries", type=int, default=256, help="query images Q for the search check")
    p.add_argument("--distributed", type=int, default=0, help="also build with torchrun on W ranks (0: skip)")
    p.add_argument("--skip-reference", action="store_true", help="no uninterrupted build (no byte comparison)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per build command")
    p.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir, removed)")
    H.add_common(p, "index_scale.json")
    a = p.parse_args(argv)
    H.require_at_least(p, a, 1, "records", "chunk_size", "batch_size", "threads", "width", "depth", "dim", "queries")
    H.require_at_least(p, a, 0, "pretrain", "distributed")
    return a


def _encoder(a):
    """The deterministic TinyCLIP, pre-trained for 3 epochs on ``--pretrain`` records (so that its
    embeddings spread out: an untrained tower maps every input alike); and the seconds that took."""
    from jomed_fast.index import synthetic_encoder

    enc = synthetic_encoder(width=a.width, depth=a.depth, dim=a.dim)
    if not a.pretrain:
        return enc, 0.0
    from jomed_fast.data.synthetic import SyntheticGenerator
    from jomed_fast.retriever import pretrain

    recs = SyntheticGenerator(seed=1, index_size=a.pretrain).index_records()
    _, t = H.time_call(lambda: pretrain(enc, [r.image for r in recs], [r.text for r in recs], epochs=3, progress=False))
    return enc, round(t.seconds, 3)


def _builds(a, work: Path) -> dict:
    """Steps 1-5 in ``work``: the record of the run."""
    from jomed_fast._files import sha256_file
    from jomed_fast.index import Index

    enc, pretrain_s = _encoder(a)
    enc_dir = enc.save(work / "encoder")
    n_chunks = -(-a.records // a.chunk_size)
    rec: dict = {
        "records": a.records,
        "chunk_size": a.chunk_size,
        "chunks": n_chunks,
        "batch_size": a.batch_size,
        "threads_per_process": a.threads,
        "encoder": {
            "width": a.width,
            "depth": a.depth,
            "dim": a.dim,
            "pretrain_records": a.pretrain,
            "pretrain_s": pretrain_s,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_at_start": list(os.getloadavg()),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
    }
    for d in ("ref", "resumed", "dist"):
        shutil.rmtree(work / d, ignore_errors=True)
    if not a.skip_reference:
        cmd = [sys.executable, *_cli(a.records, work / "ref", a, enc_dir)]
        rec["reference_build_s"] = round(_run(cmd, a.timeout), 3)
        print(f"reference build: {rec['reference_build_s']} s", flush=True)
    rec["kill_resume"] = _build_killed_then_resumed(a, enc_dir, work / "resumed", n_chunks)
    print(f"kill/resume: {rec['kill_resume']}", flush=True)
    ix, t = H.time_call(lambda: Index.open(work / "resumed", encoder=enc))
    rec["verify_s"] = round(t.seconds, 3)
    files = ("image_embeddings.npy", "text_embeddings.npy", "records.jsonl")
    same = lambda d: all(sha256_file(work / d / f) == sha256_file(work / "resumed" / f) for f in files)  # noqa: E731
    if not a.skip_reference:
        rec["resumed_identical_to_reference"] = same("ref")
    rec["bytes"] = {f: (work / "resumed" / f).stat().st_size for f in files}
    rec["search"] = _search_check(ix, enc, a)
    print(f"search match: {rec['search']['match']}", flush=True)
    if a.distributed:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(a.distributed),
            *_cli(a.records, work / "dist", a, enc_dir),
        ]
        rec["distributed"] = {"world": a.distributed, "build_s": round(_run(cmd, a.timeout), 3)}
        rec["distributed"]["identical"] = same("dist")
        print(f"distributed: {rec['distributed']}", flush=True)
    return rec


def main(argv=None) -> dict:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="index_scale.")) if a.work is None else a.work
    work.mkdir(parents=True, exist_ok=True)
    try:
        rec = _builds(a, work)
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    H.write_json(a.json, rec)
    print(f"wrote {a.json}")
    return rec


if __name__ == "__main__":
    main()
