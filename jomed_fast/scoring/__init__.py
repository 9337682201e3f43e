"""The batched candidate scorer: ``CandidateScorer(reader, task, layout)``.

Modules, one responsibility each:

==============  ===============================================================================
scorer          ``CandidateScorer``: the stages, in order (prompts, pack, images, prefix KV, chunk
                plan, score a chunk)
score_stats     ``ScoreStats``: what one call ran (rows, tokens, chunks), for benchmarks
batch           the pack stage: distinct images and prefixes, the packed batch, the suffix rows
                and their positions
inputs          argument checks: B queries, K candidates each, errors naming the argument
images          distinct images: preprocessing once, placeholder ids, the vision tower in chunks,
                the features in place of the image tokens
attention       the 4-D masks and the shared-prefix KV-cache handed to the decoder (``Prefixes``)
class_head      the class head: single-token classes, or multi-token classes as a token trie
label_set_head  the multi-label head: the reader's restricted answer-set distribution (a trie of
                every answer set) and each label's marginal probability of being in the answer
memory_budget   the per-row byte model that turns a memory budget into chunk sizes
flops           the analytic FLOP model of scoring methods (toolkit, batched HF, generate loop)
==============  ===============================================================================

Prompt layouts and ``Candidate`` live in :mod:`jomed_fast.prompts`.
"""

from ..prompts import LAYOUTS, Candidate
from . import flops
from .class_head import ClassHead
from .label_set_head import LabelSetHead
from .memory_budget import RowCost, default_budget
from .score_stats import ScoreStats
from .scorer import CandidateScorer

__all__ = [
    "LAYOUTS",
    "Candidate",
    "CandidateScorer",
    "ClassHead",
    "LabelSetHead",
    "RowCost",
    "ScoreStats",
    "default_budget",
    "flops",
]
