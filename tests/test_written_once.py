"""Each shared value and check has one home: the prompt layouts (``prompts.LAYOUTS``), the "an int,
not a bool" checks (``jomed_fast._checks``), the task -> verbalizer dependency (one way), and the
demo's settings (nested per step, the same option names and preset values as the flat form)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jomed_fast
from jomed_fast import prompts

PACKAGE = Path(jomed_fast.__file__).parent


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text(), filename=str(path))


# ---------------------------------------------------------------------------------------------
# prompt layouts
# ---------------------------------------------------------------------------------------------
def _is_layout_literal(node) -> bool:
    return (
        isinstance(node, (ast.Tuple, ast.List, ast.Set))
        and len(node.elts) == 2
        and {getattr(e, "value", None) for e in node.elts} == {"paper", "shared_query"}
    )


def test_only_prompts_defines_the_layouts():
    defined, literals = [], []
    for rel, tree in _modules():
        for node in ast.walk(tree):
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AnnAssign)
                else []
            )
            defined += [rel for t in targets if isinstance(t, ast.Name) and t.id == "LAYOUTS"]
            literals += [f"{rel}:{node.lineno}" for node in [node] if _is_layout_literal(node)]
    assert defined == ["prompts.py"]
    assert [where.split(":")[0] for where in literals] == ["prompts.py"], literals


def test_every_layout_choice_is_the_prompts_tuple():
    from jomed_fast.cli import commands
    from jomed_fast.memory import LAYOUTS as memory_layouts
    from jomed_fast.memory.plan import Run
    from jomed_fast.scoring import LAYOUTS as scoring_layouts
    from jomed_fast.train import RetrieverTrainConfig, retriever_config

    assert prompts.LAYOUTS == ("paper", "shared_query")
    assert memory_layouts is scoring_layouts is retriever_config.LAYOUTS is prompts.LAYOUTS
    layout_opts = {name: o.choices for name, c in commands().items() for o in c.options if o.name == "layout"}
    assert {"predict", "train-reader", "train-retriever", "plan-memory"} <= set(layout_opts)
    assert {name: choices for name, choices in layout_opts.items() if choices is not None} == {
        name: prompts.LAYOUTS for name, choices in layout_opts.items() if choices is not None
    }
    # one default layout for the whole pipeline (stage 1, stage 2, inference, the memory planner)
    assert RetrieverTrainConfig().layout == "paper" and Run().layout == "paper"
    with pytest.raises(ValueError, match=r"config\.layout: expected one of \('paper', 'shared_query'\), got 'x'"):
        RetrieverTrainConfig(layout="x")


# ---------------------------------------------------------------------------------------------
# "an int, not a bool"
# ---------------------------------------------------------------------------------------------
def test_the_int_predicates():
    from jomed_fast._checks import is_int, is_number

    assert [is_int(v) for v in (0, -3, True, False, 1.0, "1", None, np.int64(1))] == [
        True,
        True,
        False,
        False,
        False,
        False,
        False,
        False,
    ]
    assert [is_number(v) for v in (0, 1.5, float("inf"), True, "1", None)] == [True, True, True, False, False, False]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.check_int("partner.k", 0, 1), "partner.k: expected an int >= 1, got 0"),
        (lambda c: c.check_int("partner.k", True, 1), "partner.k: expected an int >= 1, got True"),
        (lambda c: c.check_int("k", 2.0, 1), "k: expected an int >= 1, got 2.0"),
        (lambda c: c.check_int("tokens", -1, 0), "tokens: expected an int >= 0, got -1"),
        (lambda c: c.check_int("i", 5, 0, 4), "i: expected an int in 0..4, got 5"),
        (lambda c: c.check_int("i", 5, hi=4), "i: expected an int <= 4, got 5"),
        (lambda c: c.check_int("i", "5"), "i: expected an int, got '5'"),
        (
            lambda c: c.check_int("config.max_steps", 0, 1, optional=True),
            "config.max_steps: expected an int >= 1 or None, got 0",
        ),
        (
            lambda c: c.check_int("k", 9, 1, 8, expected="an int with 1 <= k <= 8"),
            "k: expected an int with 1 <= k <= 8, got 9",
        ),
        (lambda c: c.positive_int("lora.r", 0), "lora.r: expected a positive int, got 0"),
        (lambda c: c.positive_int("limit", False, optional=True), "limit: expected a positive int or None, got False"),
    ],
)
def test_the_int_checks_read_as_the_house_error(call, message):
    import jomed_fast._checks as checks

    with pytest.raises(ValueError) as info:
        call(checks)
    assert str(info.value) == message


def test_the_int_checks_return_what_they_accept():
    from jomed_fast._checks import check_int, positive_int

    assert check_int("n", 3, 1) == 3 and check_int("n", None, 1, optional=True) is None
    assert check_int("n", 0) == 0 and check_int("n", 4, 0, 4) == 4 and positive_int("n", 1) == 1
    assert positive_int("n", None, optional=True) is None


def _sites():
    """Where the package checks arguments, with the message each gave before the shared helper."""
    from jomed_fast.data.synthetic import SyntheticConfig
    from jomed_fast.index.build import synthetic_records
    from jomed_fast.index.cost import default_nlist, index_cost
    from jomed_fast.memory.arch import DecoderShape
    from jomed_fast.memory.plan import Run
    from jomed_fast.readers.hf_reader import LoraSettings
    from jomed_fast.scoring.flops import decoder_linear_flops
    from jomed_fast.scoring.memory_budget import check_budget
    from jomed_fast.train import RetrieverTrainConfig
    from jomed_fast.train.schedule import WarmupCosine

    dec = DecoderShape(8, 1, 2, 1, 4, 16, 32)
    return [
        (lambda: RetrieverTrainConfig(k=0), "config.k: expected an int >= 1, got 0"),
        (lambda: RetrieverTrainConfig(max_steps=True), "config.max_steps: expected an int >= 1 or None, got True"),
        (lambda: WarmupCosine(10, warmup_steps=-1), "warmup_steps: expected None or an int >= 0, got -1"),
        (lambda: check_budget(True), "memory_budget: expected None or a positive number of bytes (int), got True"),
        (lambda: decoder_linear_flops(dec, -2), "tokens: expected an int >= 0, got -2"),
        (lambda: DecoderShape(0, 1, 2, 1, 4, 16, 32), "DecoderShape.hidden: expected a positive int, got 0"),
        (lambda: default_nlist(0), "n: expected an int >= 1, got 0"),
        (lambda: index_cost(100, k=True), "k: expected an int >= 1, got True"),
        (lambda: synthetic_records(0), "n: expected an int >= 1, got 0"),
        (lambda: SyntheticConfig(seed=-1), "SyntheticConfig.seed: expected an int >= 0, got -1"),
        # a bool was taken for a count here before the shared check
        (lambda: Run(K=True), "K: expected a positive int, got True"),
        (lambda: Run(chunk_size=0), "chunk_size: expected a positive int or None, got 0"),
        (lambda: LoraSettings(r=True), "lora.r: expected a positive int, got True"),
    ]


def test_the_package_checks_read_as_before():
    for call, message in _sites():
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value) == message


def _hand_rolled_int_checks(tree) -> list[int]:
    """Lines of a boolean expression that tests ``isinstance(x, bool)`` beside another call
    ``isinstance(x, int)`` (one ``isinstance(v, (bool, int, str))`` is a type filter, not a count check)."""

    def isinstance_of(node, name):
        return (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", None) == "isinstance"
            and len(node.args) == 2
            and name in {getattr(e, "id", None) for e in getattr(node.args[1], "elts", [node.args[1]])}
        )

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BoolOp):
            calls = [v.operand if isinstance(v, ast.UnaryOp) else v for v in node.values]
            bools = [c for c in calls if isinstance_of(c, "bool")]
            if bools and any(isinstance_of(c, "int") and c not in bools for c in calls):
                lines.append(node.lineno)
    return lines


def test_no_hand_rolled_int_checks_outside_the_helper():
    # the ops, the packer and the CLI keep theirs (their own argument checks)
    kept = ("ops/", "packing.py", "cli/", "_checks.py")
    found = {
        rel: lines
        for rel, tree in _modules()
        if not rel.startswith(kept)
        for lines in [_hand_rolled_int_checks(tree)]
        if lines
    }
    assert found == {}
    # the scan finds the pattern where it is written
    assert _hand_rolled_int_checks(ast.parse("ok = isinstance(v, bool) or not isinstance(v, (int, float))")) == [1]
    assert _hand_rolled_int_checks(ast.parse("ok = isinstance(v, int) and not isinstance(v, bool)")) == [1]
    assert _hand_rolled_int_checks(ast.parse("ok = v is None or isinstance(v, (bool, int))")) == []


# ---------------------------------------------------------------------------------------------
# tasks -> verbalizer, one way
# ---------------------------------------------------------------------------------------------
def test_the_task_spec_does_not_import_the_verbalizer():
    code = (
        "import sys, jomed_fast.tasks.spec, jomed_fast.tasks as t; t.get_task('breast');"
        "print('jomed_fast.tasks.verbalizer' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False"]
    spec = ast.parse((PACKAGE / "tasks" / "spec.py").read_text())
    imported = [n.module for n in ast.walk(spec) if isinstance(n, ast.ImportFrom)] + [
        a.name for n in ast.walk(spec) if isinstance(n, ast.Import) for a in n.names
    ]
    assert not [m for m in imported if m and "verbalizer" in m]


def test_the_verbalizer_is_reached_through_its_module():
    from jomed_fast import tasks
    from jomed_fast.tasks import Task, build_verbalizer, verbalizer

    assert not hasattr(Task, "verbalizer")
    assert build_verbalizer is verbalizer.build_verbalizer and tasks.Verbalizer is verbalizer.Verbalizer
    assert {"RestrictedDecoding", "Verbalizer", "build_verbalizer"} <= set(dir(tasks))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tasks.nope  # noqa: B018


# ---------------------------------------------------------------------------------------------
# the demo's settings
# ---------------------------------------------------------------------------------------------
# The flat presets as ``git show ac0d279:jomed_fast/demo/config.py`` defines them.
OLD_FULL = {
    "seed": 0,
    "arch": "qwen2_vl",
    "layout": "paper",
    "n_train": 400,
    "n_val": 200,
    "n_test": 250,
    "index_size": 1500,
    "image_size": 32,
    "misleading_fraction": 0.25,
    "hedged_rate": 0.3,
    "atypical_cue": 0.6,
    "retriever_width": 16,
    "retriever_depth": 4,
    "retriever_dim": 64,
    "retriever_epochs": 8,
    "lora_r": 8,
    "reader_lr": 3e-3,
    "reader_batch_size": 8,
    "reader_epochs": 2,
    "reader_only_epochs": 6,
    "reader_eval_every": 50,
    "stage2_queries": 400,
    "stage2_k": 20,
    "stage2_epochs": 6,
    "stage2_lr": 3e-3,
    "stage2_batch_size": 4,
    "stage2_alpha": None,
    "stage2_tau_reader": 1.0,
    "stage2_tau_retriever": 0.1,
    "stage2_n_trainable": 1,
    "stage2_weight_decay": 0.0,
    "stage2_select": "best_val_accuracy",
    "k_text": 2,
    "k_image": 2,
    "batch_size": 8,
}
OLD_PRESETS = {
    "smoke": {
        **OLD_FULL,
        "n_train": 24,
        "n_val": 8,
        "n_test": 12,
        "index_size": 120,
        "retriever_epochs": 1,
        "retriever_width": 8,
        "retriever_depth": 1,
        "retriever_dim": 32,
        "reader_epochs": 1,
        "reader_only_epochs": 1,
        "reader_eval_every": 1000,
        "stage2_queries": 8,
        "stage2_k": 4,
        "stage2_epochs": 1,
        "batch_size": 6,
    },
    "full": OLD_FULL,
    "ci": {
        **OLD_FULL,
        "n_train": 240,
        "n_val": 40,
        "n_test": 160,
        "index_size": 800,
        "retriever_epochs": 6,
        "stage2_queries": 240,
    },
}


def test_the_presets_keep_their_values_and_option_names():
    from jomed_fast.cli import commands
    from jomed_fast.demo import PRESETS

    assert {name: p.to_dict() for name, p in PRESETS.items()} == OLD_PRESETS
    assert all(list(p.to_dict()) == list(OLD_FULL) for p in PRESETS.values())  # the run key's order too
    assert {name: p.asserts_findings for name, p in PRESETS.items()} == {"smoke": False, "full": True, "ci": False}
    assert [o.name for o in commands()["demo"].options] == ["out", "preset", "progress", *OLD_FULL]
    smoke = PRESETS["smoke"]
    assert (smoke.data.n_test, smoke.stage2.k, smoke.stage1.eval_every, smoke.inference.batch_size) == (12, 4, 1000, 6)


def test_the_demo_command_sets_the_nested_settings_by_their_flags(tmp_path, monkeypatch, capsys):
    import jomed_fast.demo
    from jomed_fast.cli import main
    from jomed_fast.demo import PRESETS

    seen = []

    def fake_run_demo(out_dir, config, *, progress=True):
        seen.append(config)
        return {"main": {}, "checks": {}, "seconds": 0.0}

    monkeypatch.setattr(jomed_fast.demo, "run_demo", fake_run_demo)
    flags = ["--n-test", "7", "--stage2-alpha", "0.2", "--reader-lr", "0.01", "--lora-r", "4", "--k-image", "1"]
    assert main(["demo", "--preset", "ci", "--out", str(tmp_path), "--no-progress", *flags]) == 0
    assert seen[-1] == PRESETS["ci"].replace(n_test=7, stage2_alpha=0.2, reader_lr=0.01, lora_r=4, k_image=1)
    assert not seen[-1].asserts_findings
    config = tmp_path / "demo.yaml"
    config.write_text("stage2_alpha: 0.3\nstage2-k: 6\n")
    assert (
        main(["demo", "--config", str(config), "--out", str(tmp_path), "--no-progress", "--stage2-alpha", "none"]) == 0
    )
    assert seen[-1] == PRESETS["full"].replace(stage2_k=6) and seen[-1].stage2.alpha is None
    capsys.readouterr()


def test_settings_by_option_name():
    from jomed_fast.demo import PRESETS, DemoConfig

    full = PRESETS["full"]
    changed = full.replace(n_test=7, stage2_lr=1e-3, reader_lr=2e-3, lora_r=4, seed=3, k_image=1)
    assert (
        changed.data.n_test,
        changed.stage2.lr,
        changed.stage1.lr,
        changed.stage1.lora_r,
        changed.seed,
        changed.inference.k_image,
    ) == (7, 1e-3, 2e-3, 4, 3, 1)
    assert {k for k in OLD_FULL if changed.to_dict()[k] != OLD_FULL[k]} == {
        "n_test",
        "stage2_lr",
        "reader_lr",
        "lora_r",
        "seed",
        "k_image",
    }
    assert DemoConfig.from_dict(changed.to_dict()) == changed
    with pytest.raises(ValueError, match=r"DemoConfig: unknown settings \['stage2\.lr'\]; expected some of \["):
        full.replace(**{"stage2.lr": 1e-3})
    with pytest.raises(ValueError, match=r"DemoConfig: missing settings \['seed'\]"):
        DemoConfig.from_dict({k: v for k, v in OLD_FULL.items() if k != "seed"})


def test_the_stage_configs_are_the_ones_the_flat_settings_made():
    from jomed_fast.demo import PRESETS
    from jomed_fast.infer import InferConfig
    from jomed_fast.train import ReaderTrainConfig, RetrieverTrainConfig

    config = PRESETS["smoke"].replace(layout="shared_query", seed=5, k_text=3)
    c = {**OLD_PRESETS["smoke"], "layout": "shared_query", "seed": 5, "k_text": 3}
    # written out as the flat demo's pipeline built them
    rag = ReaderTrainConfig(
        lr=c["reader_lr"],
        epochs=c["reader_epochs"],
        batch_size=c["reader_batch_size"],
        eval_every=c["reader_eval_every"],
        save_every=c["reader_eval_every"],
        gradient_checkpointing=False,
        seed=5,
        layout="shared_query",
        k_text=3,
        k_image=2,
    )
    assert config.reader_config(retrieval=True) == rag
    assert config.reader_config(retrieval=False) == rag.replace(epochs=c["reader_only_epochs"])
    text = RetrieverTrainConfig(
        k=c["stage2_k"],
        lr=c["stage2_lr"],
        epochs=c["stage2_epochs"],
        batch_size=c["stage2_batch_size"],
        alpha=c["stage2_alpha"],
        tau_reader=c["stage2_tau_reader"],
        tau_retriever=c["stage2_tau_retriever"],
        n_trainable=c["stage2_n_trainable"],
        weight_decay=c["stage2_weight_decay"],
        select=c["stage2_select"],
        select_k=3,
        layout="shared_query",
        seed=5,
    )
    assert config.retriever_config("text") == text
    assert config.retriever_config("image") == text.replace(head="image", select_k=2)
    common = {"k_text": 3, "k_image": 2, "layout": "shared_query", "batch_size": c["batch_size"], "seed": 5}
    assert config.infer_config() == InferConfig(**common)
    assert config.infer_config(retrieval="none") == InferConfig(retrieval="none", **common)


def test_a_run_directory_resumes_only_the_same_settings(tmp_path):
    from jomed_fast.demo import PRESETS, run_demo
    from jomed_fast.demo.pipeline import check_run_settings

    smoke = PRESETS["smoke"]
    # a run directory of the flat settings resumes: its key is the same JSON
    (tmp_path / "demo_config.json").write_text(json.dumps(OLD_PRESETS["smoke"]))
    check_run_settings(tmp_path, smoke.to_dict())
    with pytest.raises(ValueError, match=r"other settings \(\['n_test', 'stage2_k'\]\); use another directory"):
        run_demo(tmp_path, smoke.replace(n_test=13, stage2_k=5), progress=False)
    # settings of another form (nested, renamed) or a damaged file: refused naming the file
    nested = {"seed": 0, "data": {"n_test": 12}}
    (tmp_path / "demo_config.json").write_text(json.dumps(nested))
    with pytest.raises(
        ValueError,
        match=r"demo_config\.json holds other setting names than this run's \(not here: "
        r"\['data'\], missing: \['arch', ",
    ):
        run_demo(tmp_path, smoke, progress=False)
    for damaged in ("{not json", "[1, 2]", "\xff\xfe"):
        (tmp_path / "demo_config.json").write_text(damaged, encoding="latin-1")
        with pytest.raises(ValueError, match=r"demo_config\.json is not a run's settings \(not a JSON object\)"):
            run_demo(tmp_path, smoke, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo_config.json"]  # nothing ran
