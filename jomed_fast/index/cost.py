r"""Memory and search-cost model of an index of N rows, D dims, b bytes per value, H heads.

Memory (disk = host = device, no padding): :math:`M = H\,N\,D\,b`.

Exact search of one head by Q queries sharing one pass over the index (fused top-k: scores never
leave the chip, as in ``ops.topk_similarity``):

.. math:: \text{bytes}(Q) = N D b + Q D b + Q k (4 + 8),\qquad \text{FLOPs}(Q) = 2 Q N D,

so the arithmetic intensity is :math:`\approx 2Q/b` FLOP/byte and the time floor on a device with
bandwidth :math:`\beta` and peak :math:`\pi` is :math:`\max(\text{bytes}/\beta, \text{FLOPs}/\pi)`.
The pass stops being bandwidth-bound at the crossover :math:`Q^* = \pi b / (2\beta)`; below it a
query batch costs the same as one query. An unfused search (score matrix written then top-k'd)
adds :math:`8QN` bytes (fp32 write + read), which equals the index traffic at :math:`Q = Db/8`.

IVF (``nlist`` lists, ``nprobe`` scanned, lists assumed balanced and probed independently): a
query reads the coarse centroids and a fraction :math:`f = nprobe/nlist` of the rows. Q queries
touch an expected fraction :math:`c(Q) = 1 - (1 - f)^Q` of the lists; the floor assumes each touched
list is read once per batch (perfect reuse), the ``no_reuse`` figure that every (query, list) pair
reads its list (faiss-GPU's IVF scan without cache hits):

.. math:: \text{bytes}_{IVF}(Q) = nlist\,D\,b + c(Q)\,N D b \;\le\; nlist\,D\,b + Q f N D b,\qquad
          \text{FLOPs}_{IVF}(Q) = 2 Q D (nlist + f N).

So IVF divides the per-query cost by about :math:`1/f` at small Q, but a large batch touches most
lists anyway: past :math:`Q \approx 1/f` its bytes approach one pass over the index and its gain
is the FLOP reduction only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .._checks import check_int

# The paper's index (JOMED, arXiv 2508.17394): image-caption/report pairs per source.
PAPER_INDEX = {"PMC-OA": 1_650_000, "ROCO": 81_000, "MIMIC-CXR": 377_000}
PAPER_DIM = 768

# Peak figures used for the floors (dense fp16 tensor-core FLOP/s, DRAM bandwidth, memory).
DEVICES = {
    "L40": {"bandwidth": 864e9, "flops": 181e12, "memory": 48e9},
    "H100 SXM": {"bandwidth": 3.35e12, "flops": 989e12, "memory": 80e9},
}


def default_nlist(n: int) -> int:
    """A power of two near :math:`4\\sqrt{N}` (faiss's rule of thumb is 4..16 sqrt(N))."""
    return 1 << max(0, round(math.log2(4 * math.sqrt(check_int("n", n, 1)))))


def _floor(bytes_: float, flops: float, dev: dict) -> dict:
    tb, tf = bytes_ / dev["bandwidth"], flops / dev["flops"]
    return {"seconds": max(tb, tf), "bandwidth_s": tb, "compute_s": tf, "bound": "bandwidth" if tb >= tf else "compute"}


def index_cost(
    n: int | None = None,
    dim: int = PAPER_DIM,
    *,
    dtype_bytes: int = 2,
    heads: int = 2,
    k: int = 10,
    queries: Sequence[int] = (1, 64, 256, 1024),
    nlist: int | None = None,
    nprobe: int = 32,
    devices: dict | None = None,
) -> dict:
    """The cost model of the module docstring for N rows (default: the paper's index) -> a dict.

    Keys: ``n``, ``dim``, ``bytes_per_head``, ``bytes_total`` (all heads), ``faiss_fp32_bytes``
    (IndexFlatIP's fp32 copy, all heads), ``per_query`` (one query, all heads: bytes and FLOPs of
    exact search), ``devices[name]``: ``fits`` (fraction of device memory), ``crossover_q``
    (:math:`Q^*`), ``exact[Q]`` and ``ivf[Q]`` (all heads: bytes, FLOPs, time floor, floor per
    query; ``ivf`` also ``no_reuse_bytes`` / ``no_reuse_seconds``).
    """
    n = sum(PAPER_INDEX.values()) if n is None else check_int("n", n, 1)
    for name, v in (("dim", dim), ("dtype_bytes", dtype_bytes), ("heads", heads), ("k", k), ("nprobe", nprobe)):
        check_int(name, v, 1)
    nlist = default_nlist(n) if nlist is None else check_int("nlist", nlist, 1)
    if nlist > n:
        raise ValueError(f"nlist: expected <= n = {n}, got {nlist}")
    for q in queries:
        check_int("queries[i]", q, 1)
    devices = DEVICES if devices is None else devices
    row = dim * dtype_bytes
    per_head = n * row
    frac = min(1.0, nprobe / nlist)

    def exact(q):
        return heads * (per_head + q * row + q * k * 12), heads * 2.0 * q * n * dim

    def ivf(q, reuse=True):
        touched = (1.0 - (1.0 - frac) ** q) if reuse else q * frac
        return (heads * (nlist * row + touched * n * row + q * k * 12), heads * 2.0 * q * dim * (nlist + frac * n))

    out: dict[str, Any] = {
        "n": n,
        "dim": dim,
        "dtype_bytes": dtype_bytes,
        "heads": heads,
        "k": k,
        "bytes_per_head": per_head,
        "bytes_total": heads * per_head,
        "faiss_fp32_bytes": heads * n * dim * 4,
        "per_query": {"bytes": exact(1)[0], "flops": exact(1)[1]},
        "ivf": {"nlist": nlist, "nprobe": nprobe, "fraction_scanned": frac},
        "devices": {},
    }
    for name, dev in devices.items():
        d: dict[str, Any] = {
            "fits": heads * per_head / dev["memory"],
            "crossover_q": dev["flops"] * dtype_bytes / (2 * dev["bandwidth"]),
            "exact": {},
            "ivf": {},
        }
        for q in queries:
            for key, fn in (("exact", exact), ("ivf", ivf)):
                b, f = fn(q)
                fl = _floor(b, f, dev)
                d[key][q] = {"bytes": b, "flops": f, **fl, "per_query_s": fl["seconds"] / q}
            b, f = ivf(q, reuse=False)
            d["ivf"][q]["no_reuse_bytes"] = b
            d["ivf"][q]["no_reuse_seconds"] = _floor(b, f, dev)["seconds"]
        out["devices"][name] = d
    return out


def _si(x: float, unit: str) -> str:
    for p, s in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= p:
            return f"{x / p:.3g} {s}{unit}"
    return f"{x:.3g} {unit}"


def _t(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s >= 1e-3 else f"{s * 1e6:.3g} µs"


def cost_markdown(c: dict) -> str:
    """The README table of :func:`index_cost`'s result."""
    lines = [
        (
            f"N = {c['n']:,} rows, D = {c['dim']}, {8 * c['dtype_bytes']}-bit, {c['heads']} heads, k = {c['k']}: "
            f"{_si(c['bytes_per_head'], 'B')} per head, {_si(c['bytes_total'], 'B')} in all "
            f"(faiss IndexFlatIP fp32 copy: {_si(c['faiss_fp32_bytes'], 'B')}); exact search reads "
            f"{_si(c['per_query']['bytes'], 'B')} and does {_si(c['per_query']['flops'], 'FLOP')} per query "
            f"(all heads). IVF: nlist = {c['ivf']['nlist']}, nprobe = {c['ivf']['nprobe']} "
            f"({100 * c['ivf']['fraction_scanned']:.2g}% of the rows scanned)."
        ),
        "",
        (
            "| device | index / memory | Q* | Q | exact: floor (bound) | exact: per query | IVF: floor | IVF: per query "
            "| IVF, no list reuse |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, d in c["devices"].items():
        for i, (q, e) in enumerate(d["exact"].items()):
            v = d["ivf"][q]
            head = f"{name} | {100 * d['fits']:.1f}% | {d['crossover_q']:.0f}" if i == 0 else " | | "
            lines.append(
                f"| {head} | {q} | {_t(e['seconds'])} ({e['bound']}) | {_t(e['per_query_s'])} | "
                f"{_t(v['seconds'])} ({v['bound']}) | {_t(v['per_query_s'])} | {_t(v['no_reuse_seconds'])} |"
            )
    return "\n".join(lines)
