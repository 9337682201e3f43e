"""``ScoreStats``: what one ``CandidateScorer.score`` call ran, counted for benchmarks and the FLOP model."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class ScoreStats:
    """What the last ``score`` call ran (for benchmarks and the FLOP model)."""

    layout: str
    queries: int
    candidates: int
    class_mode: str
    vision_images: int = 0  # distinct images through the vision tower
    vision_patches: int = 0
    image_tokens: int = 0  # image features produced (placeholder tokens filled by them)
    prefix_rows: int = 0  # distinct prefixes run
    prefix_tokens: int = 0  # real prefix tokens run through the LLM
    prefix_slots: int = 0  # including padding
    suffix_tokens: int = 0  # real suffix tokens (all rows)
    class_tokens: int = 0  # trie-node tokens (all rows)
    suffix_slots: int = 0  # suffix + node slots computed, including padding
    chunks: int = 0  # suffix forwards
    rows_per_chunk: int = 0  # rows of the largest suffix chunk
    chunk_shapes: list = dataclasses.field(default_factory=list)  # (rows, padded length incl. nodes) per chunk
    prefix_rows_per_chunk: int = 0
    row_bytes: int = 0  # one suffix row at the longest length
    memory_budget: int = 0
    forward_overhead: float = 0.0  # the cost model's fixed cost of a suffix forward, in token slots
    shared_prefix_chunks: int = 0  # chunks whose rows all read one prefix (expanded cache view)

    @property
    def llm_tokens(self) -> int:
        """Real tokens run through the language model (prefix + suffix + class tokens)."""
        return self.prefix_tokens + self.suffix_tokens + self.class_tokens
