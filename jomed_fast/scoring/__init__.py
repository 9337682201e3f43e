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
memory_budget   the per-row byte model that turns a memory budget into chunk sizes
flops           the analytic FLOP model of scoring methods (toolkit, batched HF, generate loop)
==============  ===============================================================================

Prompt layouts and ``Candidate`` live in :mod:`jomed_fast.prompts`.
"""

from ..prompts import LAYOUTS, Candidate
from . import flops
from .class_head import ClassHead
from .memory_budget import RowCost, default_budget
from .score_stats import ScoreStats
from .scorer import CandidateScorer

__all__ = ["LAYOUTS", "Candidate", "CandidateScorer", "ClassHead", "RowCost", "ScoreStats", "default_budget", "flops"]
