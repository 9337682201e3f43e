"""jomed_fast: fast kernels and pipeline for LVLM-aware multimodal retrieval in RAG-based medical
diagnosis (JOMED, Mazor & Hope, arXiv 2508.17394).

``import jomed_fast`` never imports Triton or the C++ extension; they load when first needed.
The heavier entry points (``CandidateScorer``, ``Candidate``, ``load_reader``) are resolved on
first attribute access, so importing the package stays cheap.
"""

from . import ops

__version__ = "0.1.0"

_LAZY = {
    "CandidateScorer": ("jomed_fast.scoring", "CandidateScorer"),
    "ScoreStats": ("jomed_fast.scoring", "ScoreStats"),
    "Candidate": ("jomed_fast.prompts", "Candidate"),
    "load_reader": ("jomed_fast.readers", "load_reader"),
}

__all__ = ["Candidate", "CandidateScorer", "ScoreStats", "__version__", "load_reader", "ops"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'jomed_fast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
