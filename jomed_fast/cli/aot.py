"""``aot``: the GPU-readiness check without a GPU, :func:`jomed_fast.kernels.aot.main` as a subcommand.

Compiles every shipped Triton kernel configuration for the chosen SM versions and reports
registers, shared memory and spills; the exit code is the check's own (1 when a configuration
fails to compile or spills, 2 under ``TRITON_INTERPRET``).
"""

from __future__ import annotations

from ..kernels import KERNEL_MODULES
from ..kernels.aot import ARCHS
from .options import Command, Opt

AOT_OPTS = (
    Opt("arch", list, None, "SM versions to compile for", default_doc=" ".join(map(str, ARCHS))),
    Opt(
        "modules",
        list,
        None,
        f"kernel modules, among {', '.join(KERNEL_MODULES)}",
        choices=KERNEL_MODULES,
        default_doc="all",
    ),
    Opt("json", str, None, "also write the reports as JSON to this file", default_doc="printed only"),
)


def aot_argv(v: dict) -> list[str]:
    """The check's own command line for these options; an SM version that is not an int is refused."""
    argv = []
    if v["arch"]:
        bad = [a for a in v["arch"] if not a.isdigit()]
        if bad:
            raise ValueError(f"--arch: expected SM versions as ints (89 90), got {bad[0]!r}")
        argv += ["--arch", *v["arch"]]
    if v["modules"]:
        argv += ["--modules", *v["modules"]]
    if v["json"]:
        argv += ["--json", v["json"]]
    return argv


def run_aot(v: dict) -> int:
    from ..kernels import aot

    return aot.main(aot_argv(v))


COMMANDS = (
    Command(
        "aot",
        "GPU readiness without a GPU: compile every Triton kernel configuration for sm_89 / sm_90",
        "Triton compiles each configuration the launchers ship for the target GPUs (no GPU needed); "
        "the table gives registers, shared memory and spill bytes read from the cubin. Exit code 1 when "
        "a configuration fails to compile or spills. Run it without TRITON_INTERPRET.",
        AOT_OPTS,
        run_aot,
    ),
)
