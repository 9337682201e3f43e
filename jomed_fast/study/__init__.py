"""The real-data study: the JOMED pipeline on public MedMNIST tasks over several seeds, beside
retrieval-only and supervised baselines, aggregated into one document (``make study``)."""

from .config import DATASETS, PRESETS, StudyConfig
from .run import run_one, run_study

__all__ = ["DATASETS", "PRESETS", "StudyConfig", "run_one", "run_study"]
