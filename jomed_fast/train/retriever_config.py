"""``RetrieverTrainConfig``: every option of stage 2 (retriever fine-tuning), JSON-serialisable.

Defaults are the reference implementation's (github.com/Nirmaz/JOMED, commit b7d186d), as used by
its stage-2 scripts ``run_scripts/training_retriever_{text,image}/retina/train_retriever_*_qwen.sh``
(which call ``finetune_qa.py``; ``finetune_qa.set_parser_options`` puts its own defaults before the
script's arguments):

=====================  =========  ==============================================================
option                 default    where it comes from
=====================  =========  ==============================================================
``k``                  50         scripts: ``--retriever_n_context 50``
``tau_retriever``      1.0        ``finetune_qa.py``: ``--temperature_score EPSILON`` (= "1.0")
``tau_reader``         1.0        ``finetune_qa.py``: ``--temperature_gold EPSILON`` (= "1.0")
``lr``                 1e-4       scripts: ``--lr_retriever 1e-4`` (AdamW, ``src/util.py``
                                  ``set_optim_open_flamingo``)
``weight_decay``       1.0        ``finetune_qa.py``: ``--weight_decay EPSILON`` (= "1.0"), passed
                                  to the retriever's AdamW
``warmup_steps``       20         ``finetune_qa.py``: ``WARMUP_STEPS = "20"``; cosine decay to 0
                                  over the run (``get_cosine_schedule_with_warmup``)
``batch_size``         2          scripts: ``--per_gpu_batch_size 2``
``refresh_every``      10         scripts: ``--update_base_ret 10`` (argparse prefix of
                                  ``--update_base_retr_freq``; ``train.py`` re-copies the base
                                  retriever every that many steps)
``alpha``              0.15       ``src/jomed.py`` ``partial_encoding``: ``0.15 q_learned + 0.85
                                  q_fixed`` (``--partial_learning_query_embeddings``)
``n_trainable``        10         the paper (the last 10 image-tower layers); the reference
                                  code freezes by model type and shows no such number for jina
``seed``               10         scripts: ``--seed 10``
``target``             "gold"     the paper's SPD target ``softmax(log p(a|z_k,q) / tau_reader)``
                                  (``retriever_loss`` has the four targets):
                                  ``"reference_double_softmax_gold_with_prior"`` is exactly the
                                  scripts' ``--add_prior_to_gold_score`` (the code's gold
                                  ``-cross_entropy(softmax(class logits), gold)``, a softmax applied
                                  twice, plus the retriever's detached log-prior; ``src/jomed.py``);
                                  ``"reference_double_softmax_gold"`` the code's gold alone;
                                  ``"gold_with_retriever_prior"`` the paper's gold with that prior
``candidate_query``    "mixed"    the query that retrieves the K training candidates:
                                  ``norm(alpha f_stale(x) + (1 - alpha) f_0(x))``, the reference's
                                  ``partial_encoding(base_retriever, passage_encoder_for_train)``
                                  in ``_image_retrieve`` (the same mix as the trained score, with
                                  the stale copy ``f_stale`` refreshed every ``refresh_every``
                                  steps in place of the learned encoder); ``"unmixed"``:
                                  ``f_stale(x)`` alone. The same with ``alpha=None``
``grad_clip``          None       the reference calls ``clip_grad_norm_`` before ``backward`` (no
                                  effect), so none by default
``select``             "last"     ``"best_val_accuracy"``: keep the epoch (step 0 included) whose
                                  fused accuracy on ``val`` is highest (the whole system's with a
                                  ``partner`` head, else the head's alone), as the reference
                                  evaluates fused accuracy on its eval set during training
                                  (``--fused_eval --eval_freq``, ``--eval_in_specific_step 0``)
``select_k``           2          candidates that accuracy fuses (the inference ``k`` of the head)
=====================  =========  ==============================================================

Chosen here (not in the reference): ``epochs`` (the reference runs ``--total_steps 50000``; set
``max_steps`` for that), ``checkpoint_every`` (200), ``keep_checkpoints`` (2), ``log_every`` (1:
a line of ``run_dir/log.jsonl`` per step), ``report_to`` (``"none"``; ``"tensorboard"`` also
writes ``run_dir/tensorboard/``), ``layout`` (``"paper"``, the order of the paper and its code and
the default of stage 1 and inference: the reader is distilled on the prompt it was trained on;
``"shared_query"`` is faster but another prompt, see ``jomed_fast.prompts``), ``allow_layout_mismatch``
(False: a reader whose stage-1 adapter recorded another layout is refused, naming both), ``class_mode`` /
``sequence_normalize``, ``max_labels`` (multi-label tasks: the largest answer set scored, 3;
``scoring.label_set_head``), ``dedup_candidates`` (True: the K candidates hold each caption (text
head) or image (image head) once, :mod:`.candidate_dedup`; the reference keeps copies),
``flat_target_ratio`` (0.98) and ``collapse_ratio`` (0.25), the thresholds of the per-epoch
warnings (:mod:`.retriever_diagnostics`). The reference's ``KLDivLoss()`` averages over B*K entries; we use
``ops.retrieval_kl_loss`` (mean over B): the gradient differs by the constant K, which AdamW
undoes (up to its epsilon).
"""

from __future__ import annotations

import dataclasses

from ..prompts import LAYOUTS
from ..scoring.label_set_head import DEFAULT_MAX_LABELS
from ._config import JsonConfig
from .retriever_loss import TARGETS
from .run_log import REPORT_TO

__all__ = ["CANDIDATE_QUERIES", "HEADS", "RESUME_FREE", "SELECTIONS", "TARGETS", "RetrieverTrainConfig"]

HEADS = ("text", "image")
CANDIDATE_QUERIES = ("mixed", "unmixed")
SELECTIONS = ("last", "best_val_accuracy")
CLASS_MODES = ("auto", "first_token", "sequence")
# options that cannot change the trained weights (a resume is exact whatever they are; the score
# cache is exact wherever it is): they may differ between a run and its resume
RESUME_FREE = (
    "checkpoint_every",
    "keep_checkpoints",
    "cache_path",
    "eval_each_epoch",
    "log_every",
    "report_to",
    "allow_layout_mismatch",  # a permission: the layout itself is part of the identity
    "flat_target_ratio",  # warning thresholds: they only decide what is printed
    "collapse_ratio",
)


@dataclasses.dataclass
class RetrieverTrainConfig(JsonConfig):
    """Stage-2 options; see the module docstring for the source of every default."""

    head: str = "text"
    k: int = 50
    tau_retriever: float = 1.0
    tau_reader: float = 1.0
    target: str = dataclasses.field(
        default="gold",
        metadata={
            "choices": TARGETS,
            "help": "distillation target: gold (the paper's), reference_double_softmax_gold_with_prior "
            "(exactly the authors' --add_prior_to_gold_score), reference_double_softmax_gold (the code's "
            "gold -cross_entropy(softmax(logits), gold) alone), gold_with_retriever_prior (the paper's "
            "gold with that prior)",
        },
    )
    lr: float = 1e-4
    weight_decay: float = 1.0
    warmup_steps: int = 20
    batch_size: int = 2
    epochs: int = 1
    max_steps: int | None = None
    refresh_every: int | None = 10
    alpha: float | None = 0.15
    candidate_query: str = dataclasses.field(
        default="mixed",
        metadata={
            "choices": CANDIDATE_QUERIES,
            "help": "query retrieving the training candidates: mixed, alpha x the stale learned copy + "
            "(1 - alpha) x the frozen encoder (the authors' code); unmixed, the stale copy alone",
        },
    )
    n_trainable: int = 10
    grad_clip: float | None = None
    select: str = "last"
    select_k: int = 2
    seed: int = 10
    shuffle: bool = True
    layout: str = "paper"
    allow_layout_mismatch: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "score with a layout other than the one the reader's stage-1 adapter recorded "
            "(distils a prompt the reader was not trained on)"
        },
    )
    class_mode: str = "auto"
    max_labels: int = DEFAULT_MAX_LABELS
    sequence_normalize: bool = False
    memory_budget: int | None = None
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    eval_each_epoch: bool = True
    cache_path: str | None = None
    log_every: int = 1
    report_to: str = dataclasses.field(default="none", metadata={"choices": REPORT_TO})
    dedup_candidates: bool = dataclasses.field(
        default=True,
        metadata={
            "help": "leave copies out of the K candidates (same caption for the text head, same image "
            "sha256 for the image head), the list filled from further down"
        },
    )
    flat_target_ratio: float = dataclasses.field(
        default=0.98,
        metadata={"help": "warn of a flat target when the epoch's mean target entropy >= this x log K"},
    )
    collapse_ratio: float = dataclasses.field(
        default=0.25,
        metadata={
            "help": "warn of retrieval collapse when the distinct validation records fall below this x "
            "those before training"
        },
    )

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------ checks
    def validate(self) -> RetrieverTrainConfig:
        for name, choices in (
            ("head", HEADS),
            ("target", TARGETS),
            ("candidate_query", CANDIDATE_QUERIES),
            ("layout", LAYOUTS),
            ("class_mode", CLASS_MODES),
            ("select", SELECTIONS),
        ):
            self._check_choice(name, choices)
        if self.select != "last" and not self.eval_each_epoch:
            self._fail("select", "'last' when eval_each_epoch is False (selection needs the evaluations)", self.select)
        for name in ("k", "select_k", "batch_size", "epochs", "checkpoint_every", "keep_checkpoints", "log_every"):
            self._check_int(name, 1)
        self._check_choice("report_to", REPORT_TO)
        for name in ("warmup_steps", "n_trainable", "seed"):
            self._check_int(name, 0)
        self._check_int("max_steps", 1, optional=True)
        self._check_int("refresh_every", 0, optional=True)
        self._check_int("memory_budget", 1, optional=True)
        self._check_int("max_labels", 1)
        self._check_float("tau_retriever", 0.0, lo_open=True)
        self._check_float("tau_reader", 0.0, lo_open=True)
        self._check_float("lr", 0.0)
        self._check_float("weight_decay", 0.0)
        self._check_float("alpha", 0.0, 1.0, optional=True)
        self._check_float("grad_clip", 0.0, lo_open=True, optional=True)
        self._check_float("flat_target_ratio", 0.0, 1.0)
        self._check_float("collapse_ratio", 0.0, 1.0)
        self._check_bool(
            "shuffle", "sequence_normalize", "eval_each_epoch", "allow_layout_mismatch", "dedup_candidates"
        )
        if self.cache_path is not None and not isinstance(self.cache_path, str):
            self._fail("cache_path", "a str path or None", self.cache_path)
        return self

    # ------------------------------------------------------------------------------ JSON
    @property
    def refresh_on(self) -> bool:
        return bool(self.refresh_every)
