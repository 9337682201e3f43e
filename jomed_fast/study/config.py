"""Settings of the real-data study (``jomed-fast study``), with two presets.

A study runs the demo's pipeline (``demo.pipeline.run_systems``: the tiny retriever pre-trained on
the index's pairs, stage 1 reader-only and fine-tuned RAG, stage 2, inference) on public MedMNIST
tasks from ``data_dir`` instead of the synthetic task, once per dataset and seed, beside the
supervised baselines of ``study.supervised``. Each official training split is split by
``data.index_split`` into index records (a seeded, stratified ``index_fraction`` share, captioned
by ``caption_template``) and the training queries; the official validation and test splits are
the selection and test queries.

The recipe is the demo's ``full`` preset (its ``data`` group is not read) with stage 1's
class-weighted answer loss and macro-F1 checkpoint selection (``class_weights``, ``select_by``),
since BreastMNIST is 27% malignant and the demo's recipe gives it readers that always answer the
majority class. ``full`` is the documented study (``make study``: a run took 2-2.5 minutes per
BreastMNIST seed and about 4 per RetinaMNIST seed on 2 CPU cores, two runs side by side); ``ci``
is the same study on the first queries of each split, one seed, one short epoch per stage: a
check that every step runs on real data, too small for any finding.
"""

from __future__ import annotations

import dataclasses

from ..data.index_split import DEFAULT_CAPTION
from ..demo.config import PRESETS as DEMO_PRESETS
from ..demo.config import DemoConfig

__all__ = ["DATASETS", "PRESETS", "StudyConfig"]

# dataset name -> (file under data_dir, registered task)
DATASETS = {"breastmnist": ("breastmnist.npz", "breast"), "retinamnist": ("retinamnist.npz", "retina")}


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """Everything a study depends on. ``limit`` keeps the first ``limit`` samples of each official
    split (``None``: all); ``cnn_epochs`` bounds the small CNN baseline's training."""

    datasets: tuple[str, ...] = ("breastmnist", "retinamnist")
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    data_dir: str = "../shared/data"
    index_fraction: float = 0.3
    caption_template: str = DEFAULT_CAPTION
    limit: int | None = None
    class_weights: str | None = "inverse-frequency"
    select_by: str = "macro_f1"
    cnn_epochs: int = 30
    recipe: DemoConfig = DEMO_PRESETS["full"]

    def __post_init__(self) -> None:
        unknown = [d for d in self.datasets if d not in DATASETS]
        if unknown or not self.datasets:
            raise ValueError(f"--datasets: expected some of {sorted(DATASETS)}, got {list(self.datasets)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds: expected distinct seeds, got {list(self.seeds)}")
        if not 0.0 < self.index_fraction < 1.0:
            raise ValueError(f"--index-fraction: expected a share in (0, 1), got {self.index_fraction}")
        if self.limit is not None and self.limit < 8:
            raise ValueError(f"--limit: expected at least 8 samples per split, got {self.limit}")

    def run_settings(self, dataset: str, seed: int, data_digest: str) -> dict:
        """The settings one (dataset, seed) run depends on, by name (its ``study_config.json``):
        the recipe's, less its synthetic-data group, and the study's own."""
        from ..demo.config import settings

        recipe = self.recipe.replace(seed=seed)
        flat = {s.name: s.get(recipe) for s in settings() if s.group != "data"}
        return {
            "dataset": dataset,
            "data_sha256": data_digest,
            "index_fraction": self.index_fraction,
            "caption_template": self.caption_template,
            "limit": self.limit,
            "class_weights": self.class_weights,
            "select_by": self.select_by,
            "cnn_epochs": self.cnn_epochs,
            **flat,
        }

    def reader_options(self) -> dict:
        """Stage 1's options beyond the recipe's (``train.ReaderTrainConfig`` fields)."""
        return {"class_weights": self.class_weights, "select_by": self.select_by}


PRESETS = {
    "full": StudyConfig(),
    "ci": StudyConfig(
        datasets=("breastmnist",),
        seeds=(0,),
        limit=48,
        cnn_epochs=3,
        recipe=DEMO_PRESETS["smoke"].replace(
            reader_epochs=1, reader_only_epochs=1, stage2_queries=16, stage2_k=4, stage2_epochs=1
        ),
    ),
}
