"""Both retriever heads, as the reference trains them: the text head, then the image head.

Each head gets its own query encoder started from the base encoder (``retriever.HeadEncoders``;
``run_dir/text``, ``run_dir/image``) and one score cache, ``run_dir/score_cache.bin``, serves both.
Each head is selected in the system it will serve in: the text head beside the base image head,
the image head beside the text head as selected. ``run_dir/diagnostics.png`` draws both heads'
per-epoch diagnostics (each head's own run directory holds its own).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from pathlib import Path

from ..retriever.dual import QueryEncoder
from ..retriever.head_encoders import HeadEncoders
from .retriever import CACHE_FILE, DIAGNOSTICS_PNG, RetrieverTrainResult, train_retriever, write_diagnostics_chart
from .retriever_config import RetrieverTrainConfig
from .retriever_model import Partner

__all__ = ["HeadsResult", "train_retriever_heads"]


@dataclasses.dataclass
class HeadsResult:
    """``train_retriever_heads``' outcome: each head's run and the trained per-head query encoders."""

    text: RetrieverTrainResult
    image: RetrieverTrainResult
    encoders: HeadEncoders

    def results(self) -> dict:
        return {"text": self.text, "image": self.image}


def train_retriever_heads(
    config: RetrieverTrainConfig,
    reader,
    task,
    retriever,
    retrieval,
    train: Sequence,
    val: Sequence | None = None,
    run_dir: str | Path = "runs/stage2",
    *,
    resume: bool = True,
    progress: bool = True,
    image_config: RetrieverTrainConfig | None = None,
) -> HeadsResult:
    """Both heads, as the reference: the text head (``run_dir/text``), then the image head
    (``run_dir/image``), each its own query encoder started from ``retriever`` (the *base* encoder,
    which is not changed) and mixed with it (``alpha``); see ``retriever.head_encoders``.

    ``image_config`` (default: ``config`` with ``head="image"``) may change options of the second
    run. One score cache (``run_dir/score_cache.bin``, unless ``config.cache_path``) serves both heads.
    """
    if isinstance(retriever, QueryEncoder):
        raise TypeError(
            "retriever: expected the base encoder (each head builds its own QueryEncoder), got a QueryEncoder"
        )
    if isinstance(config, dict):
        config = RetrieverTrainConfig.from_dict(config)
    root = Path(run_dir)
    cache_path = config.cache_path or str(root / CACHE_FILE)
    configs = {
        "text": config.replace(head="text", cache_path=cache_path),
        "image": (image_config or config).replace(head="image", cache_path=cache_path),
    }
    encoders: dict[str, QueryEncoder] = {}
    results: dict[str, RetrieverTrainResult] = {}
    # each head is evaluated (and selected) in the system it will serve in: the text head beside the
    # base image head, the image head beside the text head as selected
    partners = {
        "text": lambda: Partner(retriever, configs["image"].select_k),
        "image": lambda: Partner(encoders["text"].eval(), configs["text"].select_k),
    }
    for head, cfg in configs.items():
        encoders[head] = QueryEncoder(copy.deepcopy(retriever), cfg.n_trainable, cfg.alpha)
        results[head] = train_retriever(
            cfg,
            reader,
            task,
            encoders[head],
            retrieval,
            train,
            val,
            root / head,
            resume=resume,
            progress=progress,
            partner=partners[head](),
        )
    write_diagnostics_chart({h: r.to_dict() for h, r in results.items()}, Path(run_dir) / DIAGNOSTICS_PNG)
    return HeadsResult(text=results["text"], image=results["image"], encoders=HeadEncoders(**encoders))
