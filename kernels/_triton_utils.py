"""Helpers shared by the Triton kernels: interpreter detection, autotuning that also works under
``TRITON_INTERPRET=1``, and the description of every shipped compile configuration (``AotSpec``)
that ``python -m jomed_fast.kernels.aot`` compiles for sm_89 / sm_90 without a GPU.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import triton


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def cpu_do_bench(fn: Callable[[], Any], quantiles=None, **_: Any):
    """``do_bench`` replacement for the interpreter, where there is no CUDA event to time with."""
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    median = times[len(times) // 2]
    return [median for _ in quantiles] if quantiles else median


def autotune(configs: list[triton.Config], key: list[str], interpreter_configs: list[triton.Config] | None = None, **kwargs):
    """``triton.autotune`` that runs under the interpreter too.

    The interpreter's cost is per program, not per element, so it is given its own (large-block)
    configurations, timed with :func:`cpu_do_bench`.
    """
    if interpreter_enabled():
        return triton.autotune(configs=interpreter_configs or configs[:1], key=key, do_bench=cpu_do_bench, **kwargs)
    return triton.autotune(configs=configs, key=key, **kwargs)


@dataclasses.dataclass(frozen=True)
class AotSpec:
    """One compile configuration a kernel ships: what ``triton.compile`` needs to build it offline.

    signature: argument name -> Triton type (``"*fp16"``, ``"i32"``, ``"fp32"``, ``"constexpr"``).
    constexprs: values of the ``constexpr`` arguments (block sizes, flags).
    unit_args: integer arguments (inner strides) that equal 1 for contiguous inputs; the runtime
        JIT specializes such a value into a constant, so the AOT build does the same.
    aligned_args: integer arguments that are multiples of 16 in real use (model widths such as the
        embedding dim, hidden size or vocabulary, strides made of them, and sizes the launcher
        rounds up to a block); the JIT marks such a value divisible by 16, which lets loads
        vectorize and changes register use, so the AOT build marks it too. Sizes that vary per
        call (batch, rows, k) stay unspecialized.
    maxnreg: the launch's ``maxnreg`` (PTX ``.maxnreg``), when the launcher passes one.
    Pointer arguments are compiled as 16-byte aligned, as the JIT specializes fresh torch
    allocations; together this is the variant a contiguous, freshly allocated input of real
    model widths runs.
    """

    name: str
    fn: Any  # a triton.JITFunction
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    unit_args: tuple[str, ...] = ()
    aligned_args: tuple[str, ...] = ()
    maxnreg: int | None = None
