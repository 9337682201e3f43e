"""Peak memory of one call: ``PeakMemory(device)``, ``reset()`` before it, ``peak()`` after.

On CUDA the allocator's ``max_memory_allocated``. On CPU the process's peak resident set (VmHWM,
Linux), reset through ``/proc/self/clear_refs`` after ``malloc_trim(0)`` has handed freed heap
pages back, so it counts everything resident, weights too; ``resident_bytes()`` is the resident
set now. Without ``/proc`` (not Linux) the peak since the process started (``ru_maxrss``, which
cannot be reset). The benchmarks and the memory planner's measurement share it.
"""

from __future__ import annotations

import ctypes
import os

import torch

__all__ = ["PeakMemory", "resident_bytes"]


def resident_bytes() -> int:
    """The process's resident set now, in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory of one call: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the process's
    peak resident set (VmHWM), reset through ``/proc/self/clear_refs`` after ``malloc_trim(0)``
    hands freed heap pages back (so it includes everything resident, weights too); without
    ``/proc`` (not Linux) the peak since the process started (``ru_maxrss``, not resettable)."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self.linux = os.path.exists("/proc/self/clear_refs")
        self._libc: ctypes.CDLL | None
        try:
            self._libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self._libc = None

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        if self._libc is not None:
            self._libc.malloc_trim(0)
        if self.linux:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # 5: reset VmHWM to the current resident set

    def peak(self) -> int:
        """Bytes: the peak since the last :meth:`reset`."""
        if self.cuda:
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        if self.linux:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
