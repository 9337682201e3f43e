"""``demo``: the whole method on the synthetic task with the tiny models, and its report.

Every field of ``jomed_fast.demo.DemoConfig`` is an option (default: the preset's value), so a
YAML file or a flag can change any of them; ``--preset ci`` is the small run the tests use.
"""

from __future__ import annotations

import json

from .options import Command, Opt, config_from, config_options


def _demo_opts() -> tuple:
    from ..demo.config import DemoConfig

    return (Opt("out", str, "runs/demo", "output directory (a rerun resumes)"),
            Opt("preset", str, "full", "settings to start from", choices=("full", "ci", "smoke")),
            Opt("progress", bool, True, "progress on stderr"),
            *config_options(DemoConfig))


def run_demo_command(v: dict) -> int:
    from ..demo import PRESETS, DemoConfig, run_demo

    config = config_from(DemoConfig, v, base=PRESETS[v["preset"]])
    summary = run_demo(v["out"], config, progress=v["progress"])
    print(json.dumps({"main": summary["main"], "checks": summary["checks"], "seconds": summary["seconds"]}, indent=1))
    print(f"report: {v['out']}/report/report.md")
    return 0 if all(summary["checks"].values()) else 1


COMMANDS = (
    Command("demo", "the whole method on the synthetic task (tiny models, CPU) with the paper's tables",
            "Pre-trains the tiny retriever, builds the index, runs stage 1 (reader-only and fine-tuned RAG), "
            "stage 2, inference and every analysis; writes OUT/report/report.md and PNGs. Exit code 1 when a "
            "qualitative check of the paper fails.", _demo_opts(), run_demo_command),
)
