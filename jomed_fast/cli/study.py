"""``study``: the JOMED pipeline on BreastMNIST and RetinaMNIST over several seeds, beside the
retrieval-only and supervised baselines, written up as one document (``jomed_fast.study``).

``--preset full`` is the documented study (``make study`` writes ``docs/study.md``); ``ci`` runs
every step on the first 48 samples of each BreastMNIST split, one seed (what the CI runs). A rerun
resumes each (dataset, seed) run from its last complete step; a run folder made with other settings
is refused. ``--datasets`` and ``--seeds`` narrow or widen the preset's.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .options import UNSET, Command, Opt


def _study_opts() -> tuple:
    from ..study import DATASETS, PRESETS

    return (
        Opt("out", str, "runs/study", "output directory: one folder per dataset and seed (a rerun resumes)"),
        Opt(
            "preset",
            str,
            "full",
            "settings to start from (ci: every step on 48 samples per split)",
            choices=tuple(PRESETS),
        ),
        Opt("doc", str, None, "where the document goes (.md; .png and .json beside it)", default_doc="OUT/study.md"),
        Opt("data_dir", str, UNSET, "folder of the MedMNIST .npz files", default_doc="../shared/data"),
        Opt("datasets", list, None, "datasets to run", choices=tuple(DATASETS), default_doc="the preset's"),
        Opt("seeds", list, None, "seeds to run (integers)", default_doc="full: 0 1 2 3 4; ci: 0"),
        Opt("progress", bool, True, "progress on stderr"),
    )


def _seeds(values) -> tuple[int, ...] | None:
    if values is None:
        return None
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise ValueError(f"--seeds: expected integers, got {list(values)}") from None


def study_config(v: dict):
    """The preset with the options given on top."""
    from ..study import PRESETS

    changes: dict = {}
    if v["data_dir"] is not UNSET:
        changes["data_dir"] = v["data_dir"]
    if v["datasets"] is not None:
        changes["datasets"] = tuple(v["datasets"])
    if v["seeds"] is not None:
        changes["seeds"] = _seeds(v["seeds"])
    return dataclasses.replace(PRESETS[v["preset"]], **changes)


def run_study_command(v: dict) -> int:
    from ..study import run_study
    from ..study.document import write_document
    from ..study.summary import aggregate

    config = study_config(v)
    runs = run_study(v["out"], config, progress=v["progress"])
    doc = Path(v["doc"]) if v["doc"] is not None else Path(v["out"]) / "study.md"
    agg = aggregate(runs)
    write_document(doc, agg, config)
    gains = {
        d: {
            "jomed_minus_ft_rag": [c["diff_accuracy"] for c in a["comparisons"]["jomed vs ft_rag"]["all"]["seeds"]],
            "significant_gain": a["comparisons"]["jomed vs ft_rag"]["all"]["significant_gain"],
        }
        for d, a in agg.items()
    }
    print(json.dumps({"seeds": list(config.seeds), "jomed_vs_ft_rag": gains}, indent=1))
    print(f"study: {doc}")
    return 0


COMMANDS = (
    Command(
        "study",
        "the pipeline on BreastMNIST and RetinaMNIST over seeds, with baselines, as one document",
        __doc__.split("\n\n")[0].replace("``", "").replace("\n", " "),
        _study_opts(),
        run_study_command,
    ),
)
