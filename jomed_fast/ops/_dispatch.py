"""Which implementation of an op runs: the Triton kernel or the torch path.

Rule (DESIGN.md, "Dispatch"):
- CUDA tensors go to the Triton kernel, CPU tensors to the fastest correct CPU path.
- ``JOMED_FAST_BACKEND=triton|torch`` forces one path (read at every call, so tests can flip it).
- The Triton path on CPU tensors needs ``TRITON_INTERPRET=1`` set before any kernel module is
  imported; asking for it without the interpreter is an error, not a silent fallback.

Kernel modules are imported lazily by the ops, so ``import jomed_fast`` never imports Triton.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def interpreter_enabled() -> bool:
    """True when Triton runs its interpreter (``TRITON_INTERPRET=1``) instead of compiling."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def requested_backend() -> str:
    value = os.environ.get("JOMED_FAST_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"JOMED_FAST_BACKEND: expected one of {BACKENDS}, got {value!r}")
    return value


def choose_backend(device: torch.device) -> str:
    """Return ``"triton"`` or ``"torch"`` for tensors on ``device``."""
    requested = requested_backend()
    if requested == "torch":
        return "torch"
    on_cuda = device.type == "cuda"
    if requested == "triton":
        if not triton_available():
            raise RuntimeError("JOMED_FAST_BACKEND=triton: triton is not installed")
        if not on_cuda and not interpreter_enabled():
            raise RuntimeError(
                f"JOMED_FAST_BACKEND=triton with tensors on {device}: the Triton path needs CUDA "
                "tensors, or TRITON_INTERPRET=1 set before jomed_fast kernels are imported"
            )
        return "triton"
    return "triton" if on_cuda and triton_available() else "torch"
