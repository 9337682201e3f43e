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
        env=_compile_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.exists(), f"aot wrote no report:\n{proc.stdout}\n{proc.stderr}"
    return proc, json.loads(out.read_text())


def test_every_config_compiles_for_both_targets_without_spills(reports):
    proc, rows = reports
    failed = [r for r in rows if not r["ok"]]
    assert not failed, "configurations that failed to compile:\n" + "\n".join(
        f"{r['config']} sm_{r['arch']}: {r['error']}" for r in failed
    )
    spilled = [r for r in rows if r["local_bytes"] or r["stack_bytes"]]
    assert not spilled, "configurations that spill:\n" + "\n".join(
        f"{r['config']} sm_{r['arch']}: {r['local_bytes']} B" for r in spilled
    )
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


def test_spec_signature_is_read_from_the_kernel():
    """Names, order and constexprs come from the @triton.jit function; pointers from the spec's dtypes;
    every other runtime argument is i32 unless the spec types it (a float scalar)."""
    from jomed_fast.kernels import class_log_softmax, retrieval_kl_loss

    fwd = next(s for s in class_log_softmax.aot_specs() if s.name == "class_log_softmax_fwd[bf16,C<=16]")
    assert list(fwd.signature.items()) == [
        ("x_ptr", "*bf16"),
        ("ids_ptr", "*i64"),
        ("out_ptr", "*fp32"),
        ("R", "i32"),
        ("C", "i32"),
        ("stride_xr", "i32"),
        ("stride_xv", "i32"),
        ("BLOCK_R", "constexpr"),
        ("BLOCK_C", "constexpr"),
    ]
    bwd = next(s for s in retrieval_kl_loss.aot_specs() if s.name == "retrieval_kl_loss_bwd[fp16,K<=64]")
    assert bwd.signature == {
        "grad_loss_ptr": "*fp32",
        "s_ptr": "*fp16",
        "r_ptr": "*fp32",
        "grad_s_ptr": "*fp16",
        "B": "i32",
        "K": "i32",
        "stride_g": "i32",
        "stride_sb": "i32",
        "stride_sk": "i32",
        "stride_rb": "i32",
        "stride_rk": "i32",
        "inv_tau_s": "fp32",
        "inv_tau_r": "fp32",
        "BLOCK_B": "constexpr",
        "BLOCK_K": "constexpr",
    }


@pytest.mark.parametrize(
    "change,message",
    [
        (
            dict(constexprs={"BLOCK_R": 16}),
            "constexprs: expected a value for the tl.constexpr argument 'BLOCK_C', got none",
        ),
        (
            dict(constexprs={"BLOCK_R": 16, "BLOCK_C": 16, "R": 4}),
            "constexprs: expected only tl.constexpr arguments, got 'R'",
        ),
        (
            dict(dtypes={"x_ptr": "fp16", "ids_ptr": "i64"}),
            "expected the element dtype of the pointer argument 'out_ptr'",
        ),
        (
            dict(dtypes={"x_ptr": "*fp16", "ids_ptr": "i64", "out_ptr": "fp32"}),
            "pointer argument 'x_ptr' (e.g. 'fp16'), got '*fp16'",
        ),
        (
            dict(dtypes={"x_ptr": "fp16", "ids_ptr": "i64", "out_ptr": "fp32", "BLOCK_C": "i32"}),
            "dtypes: expected runtime arguments, got the tl.constexpr 'BLOCK_C'",
        ),
        (
            dict(aligned_args=("stride_xrow",)),
            "aligned_args names 'stride_xrow', expected an argument of _class_log_softmax_fwd_kernel",
        ),
        (
            dict(unit_args=("x_ptr",)),
            "unit_args / aligned_args name 'x_ptr', expected an integer argument, one of ['R', 'C', ",
        ),
    ],
)
def test_spec_names_what_it_gets_wrong(change, message):
    from jomed_fast.kernels._triton_utils import AotSpec
    from jomed_fast.kernels.class_log_softmax import _class_log_softmax_fwd_kernel

    good = dict(
        name="t",
        fn=_class_log_softmax_fwd_kernel,
        dtypes={"x_ptr": "fp16", "ids_ptr": "i64", "out_ptr": "fp32"},
        constexprs={"BLOCK_R": 16, "BLOCK_C": 16},
    )
    assert AotSpec(**good).signature["x_ptr"] == "*fp16"
    with pytest.raises(ValueError) as info:
        AotSpec(**{**good, **change})
    assert str(info.value).startswith("AotSpec t: ") and message in str(info.value), str(info.value)
