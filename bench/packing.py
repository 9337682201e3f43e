"""The candidate packer: C++ (jomed_fast._C) vs its Python reference vs the transformers path.

    python bench/packing.py [--repeats 5] [--seed 0] [--json PATH]

Workload: the ``shared_query`` layout of a Qwen2-VL reader at its usual resolution. Per query a
prefix of ~25 system tokens, the query image (grid (1, 32, 32): 256 placeholder tokens) and a
~30-token question; per candidate a retrieved image (grid (1, h, w), h, w ∈ {24, …, 36}: 144–324
tokens) and a caption of 10–200 tokens (literature captions to report-length), plus the answer
cue. K ∈ {4, 50} candidates, B ∈ {1, 16} queries.

Columns, timed side by side in one run (round-robin, median of repeats after a warm-up round):

* ``cpp`` / ``cpp_1t``: ``pack_candidates_batch`` on all of torch's threads / on one thread;
* ``python``: ``pack_candidates_batch_reference``, the plain-Python specification;
* ``hf``: what a user without the packer computes for the same M-RoPE positions — transformers'
  unmodified ``Qwen2VLModel.get_rope_index`` over the padded full sequences ``[B·K, Pm + L]``
  (with ``mm_token_type_ids``, ``image_grid_thw`` and the attention mask; building those inputs
  is not timed, so this column is a lower bound on that path);
* ``floor``: allocating and writing the packer's output bytes once (``torch.empty(n).fill_(1)``
  over as many int64 elements; the faster of one thread and all threads) — the memory-bound floor
  of any packer that returns fresh tensors, on this machine.

Before timing, the run checks that C++ and reference outputs are identical and that the ``hf``
positions equal the packer's on every real token. Writes ``bench/results/packing.json``.

Where ``jomed_fast._C`` is unavailable (``jomed_fast.packing.backend()`` says why), the ``cpp``
columns time the Python packer the package falls back to; the run says so, and records the packer
in the JSON, instead of claiming a C++ speed-up.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import random
import sys
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import _harness as H  # noqa: E402
from jomed_fast.packing import (  # noqa: E402
    QueryCandidates,
    backend,
    pack_candidates_batch,
    pack_candidates_batch_reference,
)

PAD, IMAGE, VISION_START, VISION_END = 151643, 151655, 151652, 151653
MERGE = 2


# ---------------------------------------------------------------------------------------------
# Workload
# ---------------------------------------------------------------------------------------------


def text(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(200, 150000) for _ in range(n)]


def make_query(rng: random.Random, K: int) -> QueryCandidates:
    """system + <vision_start> query image <vision_end> question | K × (<vs> image <ve> caption cue)."""
    q_grid = (1, 32, 32)
    q_tokens = q_grid[0] * q_grid[1] * q_grid[2] // MERGE**2
    system, question = text(rng, rng.randint(20, 30)), text(rng, rng.randint(15, 45))
    prefix = system + [VISION_START] + [IMAGE] * q_tokens + [VISION_END] + question
    segments, images = [], []
    for _ in range(K):
        grid = (1, 2 * rng.randint(12, 18), 2 * rng.randint(12, 18))
        n_img = grid[0] * grid[1] * grid[2] // MERGE**2
        caption = text(rng, 4 + rng.randint(10, 200)) + text(rng, 6)  # "background: …" + answer cue
        segments.append([VISION_START] + [IMAGE] * n_img + [VISION_END] + caption)
        images.append([(1, grid)])
    return QueryCandidates.from_lists(
        prefix, segments, prefix_images=[(len(system) + 1, q_grid)], candidate_images=images, spatial_merge_size=MERGE
    )


# ---------------------------------------------------------------------------------------------
# The transformers path
# ---------------------------------------------------------------------------------------------


def tiny_qwen2vl():
    """A tiny, unmodified transformers Qwen2VLModel: only its get_rope_index is used."""
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
        vision_config=dict(depth=1, embed_dim=16, num_heads=2, hidden_size=16, mlp_ratio=1, spatial_merge_size=MERGE),
    )
    return Qwen2VLModel(config).eval()


def hf_inputs(queries: list[QueryCandidates], packed) -> dict:
    """The padded full sequences [B·K, Pm + L] a user would give get_rope_index (built from the
    packed batch, which the checks below validate independently in tests/test_packer.py)."""
    B, K, L = packed.input_ids.shape
    Pm = packed.prefix_input_ids.shape[1]
    ids = torch.cat([packed.prefix_input_ids[:, None].expand(B, K, Pm), packed.input_ids], 2).reshape(B * K, Pm + L)
    types = torch.zeros_like(ids)
    grids = []
    for b, q in enumerate(queries):
        p_rows = packed.prefix_image_spans[packed.prefix_image_spans[:, 0] == b].tolist()
        c_rows = packed.image_spans[packed.image_spans[:, 0] == b].tolist()
        for k in range(K):
            for r, (_, start, length, _) in enumerate(p_rows):
                types[b * K + k, start : start + length] = 1
                grids.append(q.prefix_image_grid_thw[r])
            for _, kk, start, length, image in c_rows:
                if kk == k:
                    types[b * K + k, Pm + start : Pm + start + length] = 1
                    grids.append(q.candidate_image_grid_thw[image - c_rows[0][4]])
    return dict(
        input_ids=ids,
        mm_token_type_ids=types,
        image_grid_thw=torch.stack(grids),
        attention_mask=packed.attention_mask.reshape(B * K, Pm + L),
    )


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def timed(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time in ms of each function over ``repeats`` rounds after one warm-up round
    (round-robin: load from other processes on a shared machine falls on all columns alike)."""
    return {name: H.median_seconds(t) * 1e3 for name, t in H.round_robin(fns, repeats).items()}


def single_threaded(fn: Callable[[], object]) -> object:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


@dataclasses.dataclass
class Row:
    K: int
    B: int
    L: int
    Pm: int
    tokens: int  # real tokens packed: Σ (P_b + n_bk) over rows
    output_mib: float  # bytes the packer writes
    cpp_ms: float
    cpp_1t_ms: float
    python_ms: float
    hf_ms: float
    floor_ms: float
    speedup_vs_python: float  # with the default thread count
    speedup_vs_python_1t: float  # with one thread
    speedup_vs_hf: float
    cpp_over_floor: float
    exact: bool


def assert_same(a, b) -> None:
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if not ((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))):
            raise AssertionError(f"the {backend().name} packer and the reference differ on {f.name}")


def bench_case(K: int, B: int, repeats: int, seed: int, model) -> Row:
    rng = random.Random(seed * 1000 + K * 100 + B)
    queries = [make_query(rng, K) for _ in range(B)]
    cpp = lambda: pack_candidates_batch(queries, pad_token_id=PAD, spatial_merge_size=MERGE)  # noqa: E731
    cpp_1t = lambda: pack_candidates_batch(queries, pad_token_id=PAD, spatial_merge_size=MERGE, num_threads=1)  # noqa: E731
    python = lambda: pack_candidates_batch_reference(queries, pad_token_id=PAD, spatial_merge_size=MERGE)  # noqa: E731

    packed = cpp()
    assert_same(packed, python())
    assert_same(packed, cpp_1t())
    hf_kwargs = hf_inputs(queries, packed)
    hf = lambda: model.get_rope_index(**hf_kwargs)  # noqa: E731
    hf_pos, hf_delta = hf()
    _, _, L = packed.input_ids.shape
    Pm = packed.prefix_input_ids.shape[1]
    ours = torch.cat([packed.prefix_mrope_position_ids[:, :, None].expand(3, B, K, Pm), packed.mrope_position_ids], 3)
    real = hf_kwargs["attention_mask"].bool().expand(3, -1, -1)
    exact = torch.equal(ours.reshape(3, B * K, Pm + L)[real], hf_pos[real]) and torch.equal(
        packed.rope_deltas.reshape(-1), hf_delta.reshape(-1)
    )
    if not exact:
        raise AssertionError(f"K={K} B={B}: packer M-RoPE positions differ from transformers' get_rope_index")

    elements = sum(t.numel() for t in (getattr(packed, f.name) for f in dataclasses.fields(packed)) if t is not None)
    write = lambda: torch.empty(elements, dtype=torch.int64).fill_(1)  # noqa: E731
    slow_repeats = max(1, min(repeats, 3)) if K * B >= 200 else repeats
    # the Python fallback behind the cpp columns is as slow as the python column: as few repeats
    fast = timed(
        {"cpp": cpp, "cpp_1t": cpp_1t, "floor": write, "floor_1t": lambda: single_threaded(write)},
        repeats * 4 if backend().name == "c++" else slow_repeats,
    )
    slow = timed({"python": python, "hf": hf}, slow_repeats)
    cpp_ms, floor_ms = fast["cpp"], min(fast["floor"], fast["floor_1t"])
    return Row(
        K=K,
        B=B,
        L=L,
        Pm=Pm,
        tokens=int(packed.attention_mask.sum()),
        output_mib=elements * 8 / 2**20,
        cpp_ms=cpp_ms,
        cpp_1t_ms=fast["cpp_1t"],
        python_ms=slow["python"],
        hf_ms=slow["hf"],
        floor_ms=floor_ms,
        speedup_vs_python=slow["python"] / cpp_ms,
        speedup_vs_python_1t=slow["python"] / fast["cpp_1t"],
        speedup_vs_hf=slow["hf"] / cpp_ms,
        cpp_over_floor=cpp_ms / floor_ms,
        exact=exact,
    )


Col = H.Column
_BAR = Col("|", 1, lambda r: "|")
COLUMNS = [
    Col("K", 3, "K"),
    Col("B", 3, "B"),
    Col("L", 4, "L"),
    Col("Pm", 4, "Pm"),
    Col("tokens", 7, "tokens"),
    Col("MiB", 6, "output_mib", ".2f"),
    _BAR,
    Col("cpp ms", 8, "cpp_ms", ".3f"),
    Col("cpp 1t", 8, "cpp_1t_ms", ".3f"),
    Col("python ms", 10, "python_ms", ".2f"),
    Col("hf ms", 9, "hf_ms", ".2f"),
    Col("floor ms", 9, "floor_ms", ".3f"),
    _BAR,
    Col("x python", 9, "speedup_vs_python", ".0f", suffix="x"),
    Col("x hf", 7, "speedup_vs_hf", ".0f", suffix="x"),
    Col("/floor", 6, "cpp_over_floor", ".1f"),
]


def main(argv=None) -> int:
    parser = H.arguments(__doc__)
    H.add_common(
        parser,
        "packing.json",
        repeats=5,
        seed=0,
        repeats_help="timed calls of the slow paths at small "
        "sizes; the C++ path and the floor get 4x as many, the slow paths at K·B >= 200 at most 3",
    )
    args = parser.parse_args(argv)
    H.require_at_least(parser, args, 1, "repeats")

    packer = backend()  # also warns, once, if it is the Python fallback
    if packer.name == "c++":
        print(f"packer: C++ ({packer.reason})")
    else:
        print(f"packer: Python, not C++ ({packer.reason}): the cpp columns time the Python fallback")
    model = tiny_qwen2vl()
    rows = []
    print(
        f"packer on {torch.get_num_threads()} threads of {os.cpu_count()} CPUs (load average "
        f"{os.getloadavg()[0]:.1f}: above the CPU count, OpenMP joins wait for descheduled workers), "
        f"median of repeats"
    )
    print(H.text_table(COLUMNS))
    for K in (4, 50):
        for B in (1, 16):
            r = bench_case(K, B, args.repeats, args.seed, model)
            rows.append(r)
            print(H.text_row(COLUMNS, r), flush=True)

    target = next(r for r in rows if r.K == 50 and r.B == 16)
    if packer.name == "c++":
        verdict = "meets" if target.speedup_vs_python >= 20 else "MISSES"
        print(
            f"\nK=50, B=16: C++ {target.speedup_vs_python:.0f}x the Python reference on {torch.get_num_threads()} "
            f"threads, {target.speedup_vs_python_1t:.0f}x on one ({verdict} the >= 20x target); "
            f"outputs identical, M-RoPE equal to transformers' get_rope_index on every real token."
        )
    else:
        print(
            f"\nK=50, B=16: the C++ packer did not run ({packer.reason}); no speed-up measured. The Python "
            f"fallback's outputs equal the reference, its M-RoPE transformers' get_rope_index on every real token."
        )

    record = {
        "benchmark": "packing",
        "torch": torch.__version__,
        "packer": packer.name,  # "python": the cpp_* columns timed the Python fallback
        "packer_reason": packer.reason,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "repeats": args.repeats,
        "seed": args.seed,
        "target": {
            "K": 50,
            "B": 16,
            "min_speedup_vs_python": 20,
            "speedup_vs_python": target.speedup_vs_python,
            "speedup_vs_python_1t": target.speedup_vs_python_1t,
        },
        "load_average": os.getloadavg(),
        "rows": [dataclasses.asdict(r) for r in rows],
    }
    H.write_json(args.json, record)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
