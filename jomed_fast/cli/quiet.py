"""What a quiet command (``--no-progress`` or ``jomed-fast --quiet``) keeps off stderr besides its own
progress bars: two things the libraries print on paths that need neither.

* bitsandbytes, when it is first imported (peft imports it on every LoRA path) on a CPU with
  AVX512-BF16, logs a warning that it could not load ``gemm_4bit_forward`` from the hub's
  ``kernels`` package ("please ``pip install kernels``", ``bitsandbytes/backends/cpu/ops.py``); that
  kernel serves only ``cpu_kernel="packed"``, and the README says installing ``kernels`` is not
  needed. A :class:`logging.Filter` on that one logger drops that one record, nothing else.
* transformers draws a "Loading weights" bar over the checkpoint's tensors
  (``transformers/core_model_loading.py``) that ignores the command's ``--no-progress``;
  ``transformers.utils.logging.disable_progress_bar()`` turns it off.

:func:`quiet_libraries` does both for the duration of a command and puts back what it found; no
library is patched. Warnings and errors of any other kind still show.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from types import ModuleType

__all__ = ["BNB_LOGGER", "quiet_libraries"]

BNB_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropKernelsNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_BNB_KERNELS_NOTICE)


def _transformers_logging() -> ModuleType | None:
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # transformers is a dependency; without it no bar is drawn either
        return None
    return hf_logging


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Inside: no bitsandbytes ``kernels`` notice and no transformers weight-loading bar."""
    bnb = logging.getLogger(BNB_LOGGER)
    notice = _DropKernelsNotice()
    bnb.addFilter(notice)
    hf_logging = _transformers_logging()
    bar_was_on = hf_logging is not None and hf_logging.is_progress_bar_enabled()
    if hf_logging is not None and bar_was_on:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        bnb.removeFilter(notice)
        if hf_logging is not None and bar_was_on:
            hf_logging.enable_progress_bar()
