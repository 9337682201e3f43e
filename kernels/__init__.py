"""Triton kernels of jomed_fast, installed as ``jomed_fast.kernels`` (never as a top-level
``kernels`` module, which transformers would take for the Hugging Face hub-kernels package).

One op per file: the math and the memory traffic in the module docstring, the ``@triton.jit``
kernel(s), the launcher(s) and ``aot_specs()``, the list of every compile configuration the
launchers ship (only the launch's choices: the kernel's signature is read from the kernel, see
``AotSpec``), which ``python -m jomed_fast.kernels.aot`` compiles for sm_89 and sm_90 without a GPU.
The contract of each op (shapes, dtypes, special values, errors, dispatch), its autograd wiring,
argument checks and torch reference live in ``jomed_fast.ops``.

Importing this package imports Triton; ``jomed_fast.ops`` imports kernel modules only when a
Triton path runs. Set ``TRITON_INTERPRET=1`` before the first import to run them on CPU tensors.
"""

# Modules whose aot_specs() the AOT compiler walks, in the order it prints them.
KERNEL_MODULES = (
    "class_log_softmax",
    "head_class_log_softmax",
    "retrieval_kl_loss",
    "fuse_candidates",
    "topk_similarity",
)
