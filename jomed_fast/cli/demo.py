"""``demo``: the whole method on the synthetic task with the tiny models, and its report.

Every setting of ``jomed_fast.demo.DemoConfig`` is an option under its flat name
(``jomed_fast.demo.config.settings``: ``--n-test``, ``--stage2-lr``; default: the preset's value),
so a YAML file or a flag can change any of them; ``--preset smoke`` is the small run the tests use.
The report separates the measured checks (each could fail on this task; a held one is an existence
proof: the task is built to contain a cue stage 2 can learn) from context that holds by
construction or trivially (``jomed_fast.demo.report``). The exit code is 1 when a measured check
fails, only on a preset large enough to assert them (``DemoConfig.asserts_findings``: ``full``);
the smaller presets print them as informational.
"""

from __future__ import annotations

import json

from .options import UNSET, Command, Opt, preset_default_doc


def _presets() -> dict:
    """The presets, the default (``full``) first: ``--help`` shows its values as the defaults."""
    from ..demo.config import PRESETS

    return {"full": PRESETS["full"], **PRESETS}


def _findings_doc(presets: dict) -> str:
    asserted = [name for name, c in presets.items() if c.asserts_findings]
    informational = [name for name, c in presets.items() if not c.asserts_findings]
    return (
        f"{' and '.join(asserted)} asserts them (exit code 1 when one fails); "
        f"{' and '.join(informational)} are too small for them and report them as informational"
    )


def _setting_opts(presets: dict) -> tuple:
    """One option per setting, under its flat name (default :data:`UNSET`: the preset's value)."""
    from ..demo.config import settings

    return tuple(
        Opt(
            s.name,
            s.type,
            UNSET,
            f"DemoConfig.{s.path}",
            nullable=s.nullable,
            default_doc=preset_default_doc(presets, s.get),
        )
        for s in settings()
    )


def _demo_opts() -> tuple:
    presets = _presets()
    return (
        Opt("out", str, "runs/demo", "output directory (a rerun resumes)"),
        Opt(
            "preset",
            str,
            "full",
            f"settings to start from; the paper's findings: {_findings_doc(presets)}",
            choices=tuple(presets),
        ),
        Opt("progress", bool, True, "progress on stderr"),
        *_setting_opts(presets),
    )


def findings_line(checks: dict, preset: str, asserted: bool) -> str:
    """How the measured checks are printed: asserted (the failed ones named) or informational."""
    held = sum(bool(ok) for ok in checks.values())
    if not asserted:
        return (
            f"measured checks (informational: the {preset} preset is too small for them): {held} of {len(checks)} hold"
        )
    failed = [name for name, ok in checks.items() if not ok]
    return f"measured checks (asserted by the {preset} preset; an existence proof): {held} of {len(checks)} hold" + (
        f"; failed: {'; '.join(failed)}" if failed else ""
    )


def exit_code(checks: dict, asserted: bool) -> int:
    """0 when the pipeline ran and, where the preset asserts the findings, every one held; else 1."""
    return 1 if asserted and not all(checks.values()) else 0


def run_demo_command(v: dict) -> int:
    from ..demo import run_demo
    from ..demo.config import settings

    config = _presets()[v["preset"]].replace(**{s.name: v[s.name] for s in settings() if v[s.name] is not UNSET})
    summary = run_demo(v["out"], config, progress=v["progress"])
    checks, asserted = summary["checks"], config.asserts_findings
    print(
        json.dumps(
            {
                "main": summary["main"],
                "checks": checks,
                "context": summary.get("context", {}),
                "findings": "asserted" if asserted else "informational",
                "seconds": summary["seconds"],
            },
            indent=1,
        )
    )
    print(findings_line(checks, v["preset"], asserted))
    print(f"report: {v['out']}/report/report.md")
    return exit_code(checks, asserted)


def _description() -> str:
    return (
        "Pre-trains the tiny retriever, builds the index, runs stage 1 (reader-only and fine-tuned RAG), "
        "stage 2, inference and every analysis; writes OUT/report/report.md and PNGs, and checks the "
        f"paper's orderings as measured checks (an existence proof on a task built with a learnable cue) "
        f"beside context that holds by construction: {_findings_doc(_presets())}."
    )


COMMANDS = (
    Command(
        "demo",
        "the whole method on the synthetic task (tiny models, CPU) with the paper's tables",
        _description(),
        _demo_opts(),
        run_demo_command,
    ),
)
