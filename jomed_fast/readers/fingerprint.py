"""``reader_fingerprint(reader)``: a sha256 that changes whenever the reader's scores may change.

What it covers, in order (each piece length-prefixed so two pieces can never run together):

* the family, the quantization, the compute dtype, the linear layers kept out of the quantization
  and the CPU kernel of NF4 layers (they change the numbers: the packed kernel computes in bf16);
* every regular file at the top of the checkpoint directory (``config.json``, the safetensors
  weights, the tokenizer and image-processor files), by name and sha256 of its content;
* the LoRA adapter, when one is on: its settings and every ``lora_`` tensor *as it is in memory*
  (so an adapter trained in this process, or loaded from any directory, is covered exactly).

The score cache of stage 2 (``jomed_fast.train.score_cache``) keys every record by it, so a cache
can never hand the scores of one reader to another. File hashes are memoised per
(path, size, mtime) (``_manifest.cached_sha256``, shared with the manifest check): a 15 GB
checkpoint is read once per process, not once per call.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

from .._manifest import cached_sha256

__all__ = ["reader_fingerprint"]


def _update(h, piece: bytes) -> None:
    h.update(len(piece).to_bytes(8, "little"))
    h.update(piece)


def reader_fingerprint(reader) -> str:
    """sha256 hex of a loaded ``jomed_fast.readers.Reader`` (see the module docstring)."""
    for attr in ("path", "family", "quantization", "compute_dtype", "model"):
        if not hasattr(reader, attr):
            raise TypeError(f"reader: expected a jomed_fast.readers.Reader (load_reader), got {type(reader).__name__}")
    h = hashlib.sha256()
    pieces = (
        "jomed-reader-fingerprint-v2",
        reader.family,
        str(reader.quantization),
        str(reader.compute_dtype),
        ",".join(getattr(reader, "unquantized_layers", ())),
        str(getattr(reader, "cpu_kernel", None)),
    )
    for piece in pieces:
        _update(h, piece.encode())
    root = Path(reader.path)
    if not root.is_dir():
        raise ValueError(f"reader.path: expected the checkpoint directory it was loaded from, got {str(root)!r}")
    for f in sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")):
        _update(h, f.name.encode())
        _update(h, cached_sha256(f).encode())
    if getattr(reader, "has_lora", False):
        lora = getattr(reader, "lora", None)
        _update(
            h,
            repr(
                dataclasses.asdict(lora) if dataclasses.is_dataclass(lora) and not isinstance(lora, type) else lora
            ).encode(),
        )
        for name, p in sorted(reader.lora_parameters().items()):
            t = p.detach().cpu().contiguous()
            _update(h, f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            _update(h, t.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()
