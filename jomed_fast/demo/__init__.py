"""The end-to-end demonstration (``jomed-fast demo``): the whole method on the synthetic task with
the tiny models, the paper's tables, and checks of its qualitative findings."""

from .config import PRESETS, DemoConfig
from .pipeline import run_demo
from .report import check_findings, write_report

__all__ = ["PRESETS", "DemoConfig", "check_findings", "run_demo", "write_report"]
