"""Profile one candidate-scoring call and print the time of each named stage.

``CandidateScorer.score`` (B queries x K candidates -> [B, K, C] class log-probs) marks its stages
with named ranges (``jomed_fast/_profiling.py``): an NVTX range on CUDA builds, a
``torch.profiler.record_function`` always. This script builds the tiny offline Qwen2-VL reader in a
temporary directory (seeded random weights, no download), scores one batch under
``torch.profiler`` and prints the table of those stages, inside the ``jomed.score`` range that
wraps the call (the range inference uses for the same step):

    jomed.vision   the vision tower + projector, once per distinct image
    jomed.prefix   each distinct prompt prefix once, its KV-cache kept
    jomed.suffix   the K candidate suffixes, attending to their prefix's cache
    jomed.head     the class head on the answer positions (ops.head_class_log_softmax)

then the operators with the most self time. On CPU (the default on a machine without CUDA) it runs
in about ten seconds, most of them building the reader:

    python examples/profile_scoring.py

**Nsight Systems on a GPU.** With CUDA the same ranges are NVTX ranges, so an ``nsys`` timeline reads
as the stages above. To capture only the profiled call (not the reader build or the warm-up call),
start the capture at its ``jomed.score`` range and stop at the range's end::

    nsys profile --trace=cuda,nvtx,osrt --capture-range=nvtx --nvtx-capture=jomed.score \\
        --capture-range-end=stop --env-var=NSYS_NVTX_PROFILER_REGISTER_ONLY=0 \\
        -o scoring python examples/profile_scoring.py

``NSYS_NVTX_PROFILER_REGISTER_ONLY=0`` is needed because torch pushes its range names as plain
strings, and by default nsys matches ``--nvtx-capture`` against registered strings only. The call is
also bracketed by ``cudaProfilerStart`` / ``cudaProfilerStop`` (``torch.cuda.profiler``), so
``nsys profile --trace=cuda,nvtx --capture-range=cudaProfilerApi -o scoring python
examples/profile_scoring.py`` captures the same span without the environment variable.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings

import numpy as np
import torch
from PIL import Image
from torch.profiler import ProfilerActivity, profile

from jomed_fast import CandidateScorer
from jomed_fast._profiling import stage  # the scorer's own range helper: NVTX on CUDA, a profiler record always
from jomed_fast.readers import load_reader, tiny
from jomed_fast.scoring import Candidate

B, K = 4, 8  # queries, candidates per query
STAGES = ("jomed.score", "jomed.vision", "jomed.prefix", "jomed.suffix", "jomed.head")


def random_image(rng: np.random.Generator, size: int = 56) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8))


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rng = np.random.default_rng(0)
    query_images = [random_image(rng) for _ in range(B)]
    candidates = [
        [Candidate(random_image(rng, 28 + 14 * (k % 3)), f"candidate caption {k} of query {b}") for k in range(K)]
        for b in range(B)
    ]

    with tempfile.TemporaryDirectory() as tmp:
        path = tiny.build("qwen2_vl", f"{tmp}/qwen2_vl-tiny")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tiny checkpoint's config notes, not this script's concern
            reader = load_reader(path, device=device)
        reader.eval()
        scorer = CandidateScorer(reader, "synthetic")  # labels "0".."4", the shared_query layout

        with torch.no_grad():
            # One call first: it loads the packer and fills the tokenizer's caches, which the
            # profile should not count.
            scorer.score(query_images, None, candidates)

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
            cuda_capture = torch.cuda.profiler.profile() if device == "cuda" else contextlib.nullcontext()
            with profile(activities=activities) as prof, cuda_capture, stage("jomed.score"):
                log_probs = scorer.score(query_images, None, candidates)
                if device == "cuda":
                    torch.cuda.synchronize()  # so the range ends after the GPU work, not after its launch

    print(f"scored B={B} queries x K={K} candidates -> {tuple(log_probs.shape)} on {device}")
    print(f"suffix forwards (rows, padded length): {scorer.last_stats.chunk_shapes}\n")
    averages = prof.key_averages()
    print_stage_table({event.key: event for event in averages if event.key in STAGES}, on_cuda=device == "cuda")
    print("\noperators by self time:")
    print(averages.table(sort_by="self_device_time_total" if device == "cuda" else "self_cpu_time_total", row_limit=10))


def print_stage_table(events: dict, on_cuda: bool) -> None:
    """One row per named stage: calls, host time, GPU time on CUDA, share of the whole call.

    The stages run one after another inside ``jomed.score``, so what they leave of its time is the
    unnamed work between them: prompts and tokenization, packing, the chunk plan.
    """
    total = events["jomed.score"]
    header = f"{'stage':<28} {'calls':>5} {'host ms':>9}" + (f" {'GPU ms':>9}" if on_cuda else "") + f" {'share':>6}"
    print(header)
    print("-" * len(header))

    def row(name: str, calls: int, cpu_us: float, device_us: float) -> None:
        line = f"{name:<28} {calls:>5} {cpu_us / 1e3:>9.2f}"
        if on_cuda:
            line += f" {device_us / 1e3:>9.2f}"
        print(line + f" {cpu_us / total.cpu_time_total:>6.1%}")

    for name in STAGES[1:]:
        if name in events:
            e = events[name]
            row(name, e.count, e.cpu_time_total, e.device_time_total)
    named = [events[name] for name in STAGES[1:] if name in events]
    row(
        "(between the stages)",
        total.count,
        total.cpu_time_total - sum(e.cpu_time_total for e in named),
        total.device_time_total - sum(e.device_time_total for e in named),
    )
    row("jomed.score (the whole call)", total.count, total.cpu_time_total, total.device_time_total)


if __name__ == "__main__":
    main()
