"""jomed_fast: fast kernels and pipeline for LVLM-aware multimodal retrieval in RAG-based medical
diagnosis (JOMED, Mazor & Hope, arXiv 2508.17394).

``import jomed_fast`` never imports Triton or the C++ extension; they load when first needed.
"""

from . import ops

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
