"""The public functional API of jomed_fast (**contract**: other RAG projects import these names).

Every op has a plain-torch reference (``*_reference``, the specification) and a Triton kernel in
``jomed_fast.kernels``; CUDA tensors run the kernel, CPU tensors the fastest correct CPU path, and
``JOMED_FAST_BACKEND=triton|torch`` forces one. All ops are registered with ``torch.library`` under
the ``jomed_fast`` namespace, so code that calls them compiles with ``torch.compile(fullgraph=True)``.
"""

from .class_log_softmax import class_log_softmax, class_log_softmax_reference
from .fuse_candidates import fuse_candidates, fuse_candidates_reference
from .head_class_log_softmax import head_class_log_softmax, head_class_log_softmax_reference
from .losses import HeadClassNLLLoss, RetrievalKLLoss
from .retrieval_kl_loss import retrieval_kl_loss, retrieval_kl_loss_reference
from .topk_similarity import topk_similarity, topk_similarity_reference

__all__ = [
    "class_log_softmax",
    "class_log_softmax_reference",
    "head_class_log_softmax",
    "head_class_log_softmax_reference",
    "retrieval_kl_loss",
    "retrieval_kl_loss_reference",
    "fuse_candidates",
    "fuse_candidates_reference",
    "topk_similarity",
    "topk_similarity_reference",
    "RetrievalKLLoss",
    "HeadClassNLLLoss",
]
