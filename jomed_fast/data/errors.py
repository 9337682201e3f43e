"""The error every loader raises on bad data: it names the file and the line (or record)."""

from __future__ import annotations

import os
from typing import Optional, Union


class DataError(ValueError):
    """Bad data in a file: ``"<path>:<line>: <reason> (record '<id>')"``.

    Attributes: ``path``, ``line`` (1-based JSONL line, or ``None``), ``record`` (a record id or
    index, or ``None``), ``reason`` (the message without the location).
    """

    def __init__(
        self,
        path: Union[str, os.PathLike],
        reason: str,
        *,
        line: Optional[int] = None,
        record: Optional[Union[str, int]] = None,
    ):
        self.path = os.fspath(path)
        self.line = line
        self.record = record
        self.reason = reason
        where = self.path if line is None else f"{self.path}:{line}"
        msg = f"{where}: {reason}"
        if record is not None:
            msg += f" (record {record!r})"
        super().__init__(msg)

    def __reduce__(self):  # picklable across processes (multiprocessing workers)
        return (_rebuild, (self.path, self.reason, self.line, self.record))


def _rebuild(path, reason, line, record):
    return DataError(path, reason, line=line, record=record)
