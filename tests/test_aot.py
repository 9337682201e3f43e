"""GPU readiness without a GPU: every shipped Triton configuration compiles for sm_89 and sm_90
and spills nothing (registers and local memory read from the cubin with Triton's cuobjdump)."""

import json
import os
import subprocess
import sys

import pytest
from jomed_fast.kernels import KERNEL_MODULES


def _compile_env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the interpreter never compiles
    return env


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    proc = subprocess.run(
        [sys.executable, "-m", "jomed_fast.kernels.aot", "--json", str(out)],
        env=_compile_env(), capture_output=True, text=True, timeout=900,
    )
    assert out.exists(), f"aot wrote no report:\n{proc.stdout}\n{proc.stderr}"
    return proc, json.loads(out.read_text())


def test_every_config_compiles_for_both_targets_without_spills(reports):
    proc, rows = reports
    failed = [r for r in rows if not r["ok"]]
    assert not failed, "configurations that failed to compile:\n" + "\n".join(f"{r['config']} sm_{r['arch']}: {r['error']}" for r in failed)
    spilled = [r for r in rows if r["local_bytes"] or r["stack_bytes"]]
    assert not spilled, "configurations that spill:\n" + "\n".join(f"{r['config']} sm_{r['arch']}: {r['local_bytes']} B" for r in spilled)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for r in rows:
        assert 0 < r["registers"] <= 255


def test_report_names_the_triton_version_first(reports):
    # Whichever Triton is importable (the venv's, or one shadowing it on PYTHONPATH) compiled it.
    import triton

    proc, rows = reports
    assert proc.stdout.splitlines()[0].startswith(f"triton {triton.__version__} ("), proc.stdout[:200]
    assert {r["triton"] for r in rows} == {triton.__version__}


def test_every_kernel_module_ships_configs_for_both_archs(reports):
    _, rows = reports
    import importlib

    for name in KERNEL_MODULES:
        specs = importlib.import_module(f"jomed_fast.kernels.{name}").aot_specs()
        assert specs, f"{name}: aot_specs() is empty"
        for spec in specs:
            archs = {r["arch"] for r in rows if r["config"] == spec.name}
            assert archs == {89, 90}, f"{spec.name}: compiled for {archs}"


def test_refuses_to_run_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "jomed_fast.kernels.aot"], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "TRITON_INTERPRET" in proc.stderr
