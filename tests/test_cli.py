"""``jomed-fast``: the pipeline through the command line on files (synthetic task, tiny models),
YAML config with flag overrides, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest
import yaml
from _faults import run, workspace

from jomed_fast.cli import main
from jomed_fast.cli.options import Opt, resolve
from jomed_fast.infer import read_predictions
from jomed_fast.readers import tiny


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = workspace(root, n_train=4, n_val=4, n_test=6, index_size=60)
    reader = tiny.build("qwen2_vl", root / "reader")
    return root, data, reader


def test_build_predict_evaluate_analyze(files, capsys):
    root, data, reader = files
    code, out, _ = run(
        [
            "build-index",
            "--records",
            data / "index.jsonl",
            "--encoder",
            root / "encoder",
            "--out",
            root / "ix",
            "--batch-size",
            16,
            "--chunk-size",
            32,
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0 and json.loads(out)["count"] == 60
    config = root / "predict.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "reader": str(reader),
                "samples": str(data / "test.jsonl"),
                "index": str(root / "ix"),
                "index-records": str(data / "index.jsonl"),
                "encoder": str(root / "encoder"),
                "k_text": 1,
                "k_image": 1,
                "progress": False,
                "batch_size": 4,
            }
        )
    )
    preds = {}
    for name, extra in [("rag", []), ("none", ["--retrieval", "none"]), ("wide", ["--k-text", 2])]:
        preds[name] = root / f"{name}.jsonl"
        code, out, err = run(["predict", "--config", config, "--out", preds[name], *extra], capsys)
        assert code == 0, err
        recs = read_predictions(preds[name])
        assert len(recs) == 6
        assert len(recs[0].candidates) == {"rag": 2, "none": 1, "wide": 3}[name]  # flags override the YAML
        assert json.loads(out)["n"] == 6
    code, out, _ = run(["evaluate", "--predictions", preds["rag"], "--out", root / "m.json"], capsys)
    recs = read_predictions(preds["rag"])
    acc = sum(r.fused == r.gold for r in recs) / 6
    assert code == 0 and json.loads((root / "m.json").read_text())["fused"]["accuracy"] == pytest.approx(acc)
    code, out, _ = run(
        ["analyze", "--system", f"rag={preds['rag']}", f"wide={preds['wide']}", "--out", root / "report"], capsys
    )
    assert code == 0 and "accuracy by split" in out
    for f in ("consistency_accuracy.json", "consistency_macro_f1.md", "rerank.png"):
        assert (root / "report" / f).is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["predict", "--samples", "x.jsonl", "--out", "p.jsonl"], "--reader: required"),
        (["evaluate", "--predictions", "/nonexistent/p.jsonl"], "No such file"),
        (["build-index", "--config", "/nonexistent.yaml"], "--config: /nonexistent.yaml not found"),
        (["analyze", "--system", "nameonly", "--out", "r"], "--system: expected NAME=PATH"),
        (
            ["predict", "--reader", "/nonexistent", "--samples", "x", "--out", "p", "--k-text", "two"],
            "--k-text: expected int",
        ),
    ],
)
def test_errors_are_one_line_with_exit_code_2(argv, message, capsys):
    code, _out, err = run(argv, capsys)
    assert code == 2 and message in err and err.count("\n") == 1 and err.startswith(f"jomed-fast {argv[0]}: error:")


def test_yaml_rules(tmp_path):
    opts = (
        Opt("k", int, 2),
        Opt("name", str, None, required=True),
        Opt("flag", bool, False),
        Opt("tags", list, None),
        Opt("mode", str, "a", choices=("a", "b")),
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text("k: 5\nname: x\nflag: true\ntags: [p, q]\n")
    ns = type("NS", (), {"config": str(cfg), "k": "7"})()
    assert resolve(opts, ns) == {"k": 7, "name": "x", "flag": True, "tags": ["p", "q"], "mode": "a"}
    for text, match in [
        ("bogus: 1\nname: x\n", "unknown option 'bogus'"),
        ("k: [1]\nname: x\n", "--k: expected int"),
        ("name: x\nflag: 3\n", "--flag: expected true or false"),
        ("name: x\nmode: c\n", "--mode: expected one of a, b"),
    ]:
        cfg.write_text(text)
        with pytest.raises(ValueError, match=match):
            resolve(opts, type("NS", (), {"config": str(cfg)})())


def test_console_script_help_and_exit_code():
    out = subprocess.run(
        [sys.executable, "-m", "jomed_fast.cli", "predict", "--help"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0 and "--k-text" in out.stdout and "--config" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "jomed_fast.cli", "evaluate"], capture_output=True, text=True, check=False
    )
    assert (
        bad.returncode == 2
        and bad.stderr.strip()
        == "jomed-fast evaluate: error: --predictions: required (give the flag or set predictions in the --config file)"
    )


def test_a_config_that_is_not_a_mapping_is_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("- 1\n")
    with pytest.raises(TypeError, match="must hold a mapping"):
        resolve((Opt("k", int, 2),), type("NS", (), {"config": str(cfg)})())


def test_train_reader_then_retriever_through_the_cli(files, capsys, tmp_path):
    root, data, reader = files
    ix = tmp_path / "ix"
    assert (
        run(
            [
                "build-index",
                "--records",
                data / "index.jsonl",
                "--encoder",
                root / "encoder",
                "--out",
                ix,
                "--no-progress",
            ],
            capsys,
        )[0]
        == 0
    )
    common = [
        "--reader",
        reader,
        "--train",
        data / "train.jsonl",
        "--val",
        data / "val.jsonl",
        "--index",
        ix,
        "--index-records",
        data / "index.jsonl",
        "--encoder",
        root / "encoder",
        "--no-progress",
    ]
    code, out, err = run(
        [
            "train-reader",
            *common,
            "--run-dir",
            tmp_path / "s1",
            "--max-steps",
            2,
            "--batch-size",
            2,
            "--lr",
            1e-3,
            "--no-gradient-checkpointing",
        ],
        capsys,
    )
    assert code == 0, err
    s1 = json.loads(out)
    assert s1["steps"] == 2 and (tmp_path / "s1" / "adapter" / "adapter_config.json").is_file()
    code, out, err = run(
        [
            "train-retriever",
            *common,
            "--adapter",
            s1["adapter"],
            "--run-dir",
            tmp_path / "s2",
            "--heads",
            "text",
            "--k",
            4,
            "--max-steps",
            2,
            "--batch-size",
            2,
        ],
        capsys,
    )
    assert code == 0, err
    s2 = json.loads(out)
    qdir = tmp_path / "s2" / "query_encoder"
    assert s2["query_encoder"] == str(qdir) and (qdir / "heads.json").is_file()
    assert (qdir / "text" / "model.safetensors").is_file() and (qdir / "image" / "model.safetensors").is_file()
    assert s2["text"]["cache"]["misses"] > 0
    # predict with the trained query encoders; the index still opens with its own encoder
    code, out, err = run(
        [
            "predict",
            "--reader",
            reader,
            "--adapter",
            s1["adapter"],
            "--samples",
            data / "test.jsonl",
            "--index",
            ix,
            "--index-records",
            data / "index.jsonl",
            "--encoder",
            root / "encoder",
            "--query-encoder",
            qdir,
            "--out",
            tmp_path / "p.jsonl",
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0, err
    assert 0.0 <= json.loads(out)["accuracy"] <= 1.0 and len(read_predictions(tmp_path / "p.jsonl")) > 0
    # a rerun with other options in the same run directory is refused, not mixed in
    code, _out, err = run(
        [
            "train-retriever",
            *common,
            "--adapter",
            s1["adapter"],
            "--run-dir",
            tmp_path / "s2",
            "--heads",
            "text",
            "--k",
            4,
            "--max-steps",
            3,
            "--batch-size",
            2,
        ],
        capsys,
    )
    assert code == 2 and "was made from other inputs (config.max_steps changed)" in err


def test_predict_open_vqa_through_the_cli(files, capsys, tmp_path):
    root, data, reader = files
    rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()][:2]
    samples = tmp_path / "open.jsonl"
    samples.write_text(
        "".join(
            json.dumps(
                {
                    "id": r["id"],
                    "image_path": str(data / r["image_path"]),
                    "question": "what lesion is seen?",
                    "answer": "a simple cyst",
                }
            )
            + "\n"
            for r in rows
        )
    )
    code, out, err = run(
        [
            "predict",
            "--reader",
            reader,
            "--task",
            "vqa_rad_open",
            "--samples",
            samples,
            "--retrieval",
            "none",
            "--max-new-tokens",
            3,
            "--out",
            tmp_path / "p.jsonl",
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0, err
    recs = read_predictions(tmp_path / "p.jsonl")
    assert [r.kind for r in recs] == ["vqa_open"] * 2 and all(isinstance(r.fused, str) for r in recs)
    assert {"exact_match", "f1", "recall", "precision"} <= set(json.loads(out))


def test_version_is_the_package_version(capsys):
    from importlib.metadata import version as installed

    import jomed_fast

    assert installed("jomed_fast") == jomed_fast.__version__  # setup.py and __init__ state it apart
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out == f"jomed-fast {jomed_fast.__version__}\n"
    out = subprocess.run(
        [sys.executable, "-m", "jomed_fast.cli", "--version"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0 and out.stdout == f"jomed-fast {jomed_fast.__version__}\n"


def _help_entries(text: str) -> dict:
    """``--flag`` -> its whole help text (argparse wraps it over several lines), from ``--help``."""
    entries, flag = {}, None
    for line in text.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            entries[flag] = line
        elif flag is not None and line.startswith("    "):
            entries[flag] += " " + line
    return {k: " ".join(v.split()) for k, v in entries.items()}


def _help(command: str, capsys) -> dict:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    return _help_entries(capsys.readouterr().out)


@pytest.mark.parametrize(
    "command",
    ["build-index", "train-reader", "train-retriever", "predict", "evaluate", "analyze", "plan-memory", "demo"],
)
def test_help_names_each_default_once(command, capsys):
    from jomed_fast.cli import commands

    entries = _help(command, capsys)
    assert {o.flag for o in commands()[command].options} <= set(entries)
    for flag, text in entries.items():
        assert text.lower().count("default") <= 1, text
        if flag not in ("-h", "--config"):
            assert text.endswith("(required)") or "(default: " in text, text


def test_help_shows_the_real_defaults(capsys):
    from jomed_fast.demo import PRESETS
    from jomed_fast.train import ReaderTrainConfig, RetrieverTrainConfig

    assert _help("predict", capsys)["--k-text"].endswith("(default: 2)")
    assert _help("predict", capsys)["--device"].endswith("(default: cuda when available, else cpu)")
    assert _help("train-reader", capsys)["--lr"].endswith(f"(default: {ReaderTrainConfig().lr!r})")
    assert _help("train-retriever", capsys)["--seed"].endswith(f"(default: {RetrieverTrainConfig().seed!r})")
    assert _help("plan-memory", capsys)["--budget-gb"].endswith("(default: 40.0)")
    demo = _help("demo", capsys)
    full, smoke, ci = (PRESETS[p].data.n_test for p in ("full", "smoke", "ci"))
    assert demo["--n-test"].endswith(f"(default: {full}; smoke: {smoke}, ci: {ci})")
    assert demo["--layout"].endswith("(default: paper)") and demo["--preset"].endswith("(default: full)")


def test_plan_memory_reads_a_config_and_flags_override_it(tmp_path, capsys):
    from jomed_fast.memory.cli import main as module_main

    cfg = tmp_path / "plan.yaml"
    cfg.write_text(yaml.safe_dump({"model": ["pixtral_12b"], "batch": 3, "lora-rank": 16}))
    code, out, err = run(["plan-memory", "--config", cfg], capsys)
    assert code == 0, err
    assert "**pixtral_12b**" in out and "**qwen2_vl_7b**" not in out and "batch=3" in out and "LoRA r=16" in out
    code, out, err = run(["plan-memory", "--config", cfg, "--batch", 2, "--model", "qwen2_vl_7b"], capsys)
    assert code == 0 and "**qwen2_vl_7b**" in out and "**pixtral_12b**" not in out and "batch=2" in out
    assert "batch=3" not in out and "LoRA r=16" in out
    # python -m jomed_fast.memory: the same options through the same path
    assert module_main(["--config", str(cfg), "--batch", "2"]) == 0 and "batch=2" in capsys.readouterr().out
    cfg.write_text("batch: two\n")
    code, _out, err = run(["plan-memory", "--config", cfg], capsys)
    assert code == 2 and err == f"jomed-fast plan-memory: error: --batch: expected int (in {cfg}), got 'two'\n"
    cfg.write_text("budget: 3\n")
    assert module_main(["--config", str(cfg)]) == 2
    assert capsys.readouterr().err.startswith("python -m jomed_fast.memory: error: --config: unknown option 'budget'")


class _Stop(Exception):
    """Raised by a spy once it has seen what the command built: the run goes no further."""


def test_max_labels_and_prompts_reach_every_stage(files, capsys, tmp_path, monkeypatch):
    """``--max-labels`` reaches stage 1's and stage 2's configs (so their run identities) and
    predict's scorer; ``--prompts`` picks the task variant; a single-label task refuses the flag."""
    import dataclasses

    import jomed_fast.scoring
    import jomed_fast.train
    from jomed_fast.tasks import get_task, register_task

    root, data, reader = files
    synthetic = get_task("synthetic")
    sets = register_task(dataclasses.replace(synthetic, name="synthetic_sets_cli", kind="multilabel"), overwrite=True)
    seen: dict = {}

    def spy(name):
        def record(*args, **kwargs):
            seen[name] = (args, kwargs)
            raise _Stop

        return record

    monkeypatch.setattr(jomed_fast.train, "train_reader", spy("train_reader"))
    monkeypatch.setattr(jomed_fast.train, "train_retriever_heads", spy("train_retriever_heads"))
    monkeypatch.setattr(jomed_fast.scoring, "CandidateScorer", spy("scorer"))
    common = ["--reader", reader, "--train", data / "train.jsonl", "--run-dir", tmp_path / "r", "--no-progress"]
    for command in ("train-reader", "train-retriever"):
        with pytest.raises(_Stop):
            main([command, *map(str, common), "--task", sets.name, "--max-labels", "2", *_index(root, data)])
    assert seen["train_reader"][0][0].max_labels == 2
    assert seen["train_retriever_heads"][0][0].max_labels == 2
    with pytest.raises(_Stop):
        main(["predict", "--reader", str(reader), "--samples", str(data / "test.jsonl"), "--out", str(tmp_path / "p"),
              "--retrieval", "none", "--task", sets.name, "--max-labels", "4"])  # fmt: skip
    assert seen["scorer"][1]["max_labels"] == 4 and seen["scorer"][0][1] is sets
    # the reference prompts of a task that has them; a single-label task refuses --max-labels
    with pytest.raises(_Stop):
        main(["predict", "--reader", str(reader), "--samples", str(data / "test.jsonl"), "--out", str(tmp_path / "p"),
              "--retrieval", "none", "--task", "synthetic", "--prompts", "reference"])  # fmt: skip
    assert seen["scorer"][0][1] is get_task("synthetic", "reference") and seen["scorer"][1]["max_labels"] == 3
    from jomed_fast.cli.common import task_from

    breast = {p: task_from({"task": "breast", "prompts": p}) for p in ("paper", "reference")}
    assert breast["reference"] is get_task("breast_reference") and breast["paper"] is get_task("breast")
    assert breast["reference"].identity != breast["paper"].identity
    capsys.readouterr()  # what the runs above printed (the reader's loading bar)
    code, _out, err = run(["predict", "--reader", reader, "--samples", data / "test.jsonl", "--out", tmp_path / "q",
                           "--retrieval", "none", "--max-labels", 2], capsys)  # fmt: skip
    assert code == 2 and err == (
        "jomed-fast predict: error: --max-labels: applies to multi-label tasks only; task 'synthetic' is multiclass\n"
    )


def _index(root, data) -> list[str]:
    ix = root / "ix_max_labels"
    if not ix.is_dir():
        assert main(["build-index", "--records", str(data / "index.jsonl"), "--encoder", str(root / "encoder"),
                     "--out", str(ix), "--no-progress"]) == 0  # fmt: skip
    return ["--index", str(ix), "--index-records", str(data / "index.jsonl"), "--encoder", str(root / "encoder")]
