"""The GPU check's steps for the ops: each in fp32 / fp16 / bf16 against its float64 reference
(:func:`correctness_steps`) and each kernel against the torch composition it replaces
(:func:`speed_steps`), with the tensors each allocates and the bytes and FLOPs each call moves."""

from __future__ import annotations

from bench._gpu_check_steps import DRAW_CHUNK, DTYPES, ELEMENT_BYTES, JIT_ALLOWANCE_S, Alloc, Shapes, Step


def _e(dtype: str) -> int:
    return ELEMENT_BYTES[dtype]


def correctness_steps(s: Shapes) -> list[Step]:
    """Every op in fp32 / fp16 / bf16 against its float64 reference, forward and backward."""
    steps = []
    R = s.B * s.K
    for dtype in DTYPES:
        e = _e(dtype)
        for C in s.classes:
            steps.append(
                Step(
                    f"correctness/class_log_softmax/{dtype}/C={C}",
                    "correctness",
                    "class_log_softmax",
                    dtype,
                    {"R": R, "V": s.V, "C": C},
                    [
                        Alloc("logits", (R, s.V), dtype),
                        Alloc("d logits", (R, s.V), dtype),
                        Alloc("fp32 draw of the logits", (R, s.V), "float32"),
                        Alloc("float64 class logits, reference", (R, C), "float64"),
                    ],
                    calls=1,
                    moved_bytes=2 * R * s.V * e,  # backward writes [R, V]; forward reads C columns
                    allowance_s=2 * JIT_ALLOWANCE_S,
                )
            )
            steps.append(
                Step(
                    f"correctness/head_class_log_softmax/{dtype}/C={C}",
                    "correctness",
                    "head_class_log_softmax",
                    dtype,
                    {"N": R, "H": s.H, "V": s.V, "C": C},
                    [
                        Alloc("weight", (s.V, s.H), dtype),
                        Alloc("d weight (dense)", (s.V, s.H), dtype),
                        Alloc("hidden + d hidden", (2 * R, s.H), dtype),
                        Alloc("float64 hidden + class rows + grads, reference", (2 * (R + C), s.H), "float64"),
                    ],
                    calls=1,
                    moved_bytes=2 * s.V * s.H * e,  # the init of weight, the backward's zeroed [V, H]
                    flops=3 * 2 * R * C * s.H,
                    allowance_s=3 * JIT_ALLOWANCE_S,
                )
            )
            steps.append(
                Step(
                    f"correctness/fuse_candidates/{dtype}/C={C}",
                    "correctness",
                    "fuse_candidates",
                    dtype,
                    {"B": s.fuse_rows, "K": s.K, "C": C},
                    [
                        Alloc("log-probs + grad", (2, s.fuse_rows, s.K, C), dtype),
                        Alloc("float64 log-probs + grad, reference", (2, s.fuse_rows, s.K, C), "float64"),
                        Alloc("scores + grads", (4, s.fuse_rows, s.K), "float64"),
                    ],
                    moved_bytes=4 * s.fuse_rows * s.K * C * 8,
                    allowance_s=2 * JIT_ALLOWANCE_S,
                )
            )
        steps.append(
            Step(
                f"correctness/retrieval_kl_loss/{dtype}",
                "correctness",
                "retrieval_kl_loss",
                dtype,
                {"B": s.kl_rows, "K": s.K},
                [Alloc("scores, reader log-likelihoods, grads (+ float64 copies)", (6, s.kl_rows, s.K), "float64")],
                moved_bytes=6 * s.kl_rows * s.K * 8,
                allowance_s=2 * JIT_ALLOWANCE_S,
            )
        )
        steps.append(
            Step(
                f"correctness/topk_similarity/{dtype}",
                "correctness",
                "topk_similarity",
                dtype,
                {"Q": s.Q_check, "N": s.N, "D": s.D, "k": s.k},
                [
                    Alloc("index", (s.N, s.D), dtype),
                    Alloc("fp32 draw of an index chunk, normalised", (2, min(DRAW_CHUNK, s.N), s.D), "float32"),
                    Alloc("float64 index chunk, reference", (min(s.ref_chunk, s.N), s.D), "float64"),
                    Alloc("float64 scores [Q, N], reference", (s.Q_check, s.N), "float64"),
                    Alloc("float64 scores, sorted top k + 1", (s.Q_check, s.N), "float64"),
                ],
                moved_bytes=s.N * s.D * (e + 8) + 2 * s.Q_check * s.N * 8,
                flops=2 * 2 * s.Q_check * s.N * s.D,
                allowance_s=JIT_ALLOWANCE_S,
                note="float64 reference scored chunk by chunk (a float64 copy of the whole index would not fit)",
            )
        )
    return steps


def speed_steps(s: Shapes, faiss_gpu: bool) -> list[Step]:
    """Each kernel against the torch composition it replaces (and faiss-gpu for the top-k).

    Bytes per call (the analytic model of bench/kernels.py): the fused ops read their inputs once and
    write their outputs once; the baselines also write and read back their intermediates."""
    R, C = s.B * s.K, max(s.classes)
    n_calls = 1 + s.speed_repeats  # a warm-up call, then the timed ones
    steps = []
    e = 2  # bf16: the reader's head and logits
    steps.append(
        Step(
            "speed/head_class_log_softmax",
            "speed",
            "head_class_log_softmax",
            "bfloat16",
            {"N": R, "H": s.H, "V": s.V, "C": C},
            [
                Alloc("weight", (s.V, s.H), "bfloat16"),
                Alloc("hidden", (R, s.H), "bfloat16"),
                Alloc("baseline logits [N, V]", (R, s.V), "bfloat16"),
                Alloc("baseline log-softmax input", (R, C), "float32"),
            ],
            repeats=s.speed_repeats,
            calls=n_calls,
            moved_bytes=(R * s.H + C * s.H) * e + R * C * 4,
            flops=2 * R * C * s.H,
            baseline="hidden @ W.T -> gather -> log_softmax",
            baseline_moved_bytes=(R * s.H + s.V * s.H) * e + 2 * R * s.V * e + R * C * 4,
            baseline_flops=2 * R * s.V * s.H,
            allowance_s=JIT_ALLOWANCE_S,
        )
    )
    steps.append(
        Step(
            "speed/class_log_softmax",
            "speed",
            "class_log_softmax",
            "bfloat16",
            {"R": R, "V": s.V, "C": C},
            [
                Alloc("logits", (R, s.V), "bfloat16"),
                Alloc("baseline fp32 logits + log-softmax", (2, R, s.V), "float32"),
            ],
            repeats=s.speed_repeats,
            calls=n_calls,
            moved_bytes=R * C * (e + 4),
            baseline="log_softmax over V -> gather -> renormalise",
            baseline_moved_bytes=R * s.V * (e + 4 + 4),
            allowance_s=JIT_ALLOWANCE_S,
        )
    )
    steps.append(
        Step(
            "speed/retrieval_kl_loss",
            "speed",
            "retrieval_kl_loss (fwd+bwd)",
            "float32",
            {"B": s.kl_rows, "K": s.K},
            [Alloc("scores, reader log-likelihoods, grad, intermediates", (8, s.kl_rows, s.K), "float32")],
            repeats=s.speed_repeats,
            calls=n_calls,
            moved_bytes=4 * s.kl_rows * s.K * 3,
            baseline="softmax + log_softmax + F.kl_div (fwd+bwd)",
            baseline_moved_bytes=4 * s.kl_rows * s.K * 10,
            allowance_s=JIT_ALLOWANCE_S,
        )
    )
    B, K = s.fuse_rows, s.fuse_K
    steps.append(
        Step(
            "speed/fuse_candidates",
            "speed",
            "fuse_candidates",
            "float32",
            {"B": B, "K": K, "C": C},
            [Alloc("log-probs, the baseline's two [B, K, C] intermediates", (3, B, K, C), "float32")],
            repeats=s.speed_repeats,
            calls=n_calls,
            moved_bytes=4 * (B * K * C + B * K + B * C),
            baseline="exp * softmax(s) summed over K",
            baseline_moved_bytes=4 * (B * K * C + B * K + B * C) + 4 * 3 * B * K * C,
            allowance_s=JIT_ALLOWANCE_S,
        )
    )
    topk_bytes = s.N * s.D * 2 + s.Q * s.D * 4 + s.Q * s.k * 12
    steps.append(
        Step(
            "speed/topk_similarity",
            "speed",
            "topk_similarity",
            "float16",
            {"Q": s.Q, "N": s.N, "D": s.D, "k": s.k},
            [
                Alloc("fp16 index", (s.N, s.D), "float16"),
                Alloc("fp32 draw of an index chunk, normalised", (2, min(DRAW_CHUNK, s.N), s.D), "float32"),
                Alloc("baseline scores [Q, N] + topk workspace", (2, s.Q, s.N), "float16"),
            ],
            repeats=s.speed_repeats,
            calls=n_calls,
            moved_bytes=topk_bytes,
            flops=2 * s.Q * s.N * s.D,
            baseline="matmul [Q, N] + torch.topk",
            baseline_moved_bytes=topk_bytes + s.Q * s.N * 2 * 2,
            baseline_flops=2 * s.Q * s.N * s.D,
            allowance_s=JIT_ALLOWANCE_S,
        )
    )
    if faiss_gpu:
        steps.append(
            Step(
                "speed/topk_similarity/faiss",
                "speed",
                "topk_similarity",
                "float16",
                {"Q": s.Q, "N": s.N, "D": s.D, "k": s.k},
                [
                    Alloc("fp16 index", (s.N, s.D), "float16"),
                    Alloc("faiss GpuIndexFlatIP (fp32)", (s.N, s.D), "float32"),
                ],
                repeats=s.speed_repeats,
                calls=n_calls,
                moved_bytes=topk_bytes,
                flops=2 * s.Q * s.N * s.D,
                baseline="faiss GpuIndexFlatIP (fp32 copy of the index)",
                baseline_moved_bytes=s.N * s.D * 4 + s.Q * s.D * 4 + s.Q * s.k * 12,
                baseline_flops=2 * s.Q * s.N * s.D,
                allowance_s=JIT_ALLOWANCE_S + 5.0,  # building the faiss index on the GPU
            )
        )
    return steps
