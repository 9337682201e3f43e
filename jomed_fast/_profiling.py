"""Named ranges for profilers: NVTX on CUDA builds (Nsight Systems), ``record_function`` always
(``torch.profiler`` traces). ``torch.cuda.nvtx`` raises on a CPU-only torch build, so it is only
entered where CUDA is available."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def stage(name: str):
    """``with stage("jomed.prefix"): ...`` — an NVTX range (CUDA) and a profiler record."""
    with contextlib.ExitStack() as stack:
        if torch.cuda.is_available():
            stack.enter_context(torch.cuda.nvtx.range(name))
        stack.enter_context(torch.profiler.record_function(name))
        yield
