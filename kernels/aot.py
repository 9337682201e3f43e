"""Compile every shipped Triton kernel configuration for the target GPUs, with no GPU present.

    python -m jomed_fast.kernels.aot [--arch 89 90] [--json PATH]

For each kernel module in ``jomed_fast.kernels.KERNEL_MODULES`` and each ``AotSpec`` its
``aot_specs()`` returns, Triton compiles the kernel for sm_89 (L40) and sm_90 (H100) through
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``; the resulting cubin is read
with the ``cuobjdump`` that Triton bundles to report registers per thread, shared memory and
local memory (spill) bytes. Each configuration is compiled as the JIT specializes the launch it
describes (see ``AotSpec``: unit strides, 16-divisible pointers and model widths, ``maxnreg``).
The first line printed names the Triton version and where it was imported from. Exit status 1
when any configuration fails to compile or spills.

Run it without ``TRITON_INTERPRET``: under the interpreter kernels are not compiled.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

ARCHS = (89, 90)  # sm_89: L40 / L40S / RTX 4090; sm_90: H100 / H200


@dataclasses.dataclass
class CompileReport:
    kernel: str
    config: str
    arch: int
    ok: bool
    registers: int | None = None
    shared_bytes: int | None = None
    local_bytes: int | None = None
    stack_bytes: int | None = None
    error: str | None = None
    triton: str | None = None  # the version that compiled it

    @property
    def spills(self) -> bool:
        return bool(self.local_bytes) or bool(self.stack_bytes)


def cuobjdump_path() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump: expected it in Triton's bundled NVIDIA tools at {path}, found nothing")
    return path


_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def resource_usage(cubin: bytes) -> tuple[int, int, int, int]:
    """(registers, stack, shared, local) bytes of the single kernel in ``cubin``, via cuobjdump -res-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [cuobjdump_path(), "-res-usage", f.name], check=True, capture_output=True, text=True
        ).stdout
    match = _RES_USAGE.search(text)
    if match is None:
        raise RuntimeError(f"cuobjdump -res-usage: expected a 'REG:.. STACK:.. SHARED:.. LOCAL:..' line, got {text!r}")
    reg, stack, shared, local = (int(g) for g in match.groups())
    return reg, stack, shared, local


def compile_spec(spec, arch: int) -> CompileReport:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = spec.fn.fn.__name__
    report = CompileReport(kernel=kernel, config=spec.name, arch=arch, ok=False, triton=triton.__version__)
    try:
        signature, constexprs = spec.signature, dict(spec.constexprs)
        for name in spec.unit_args:  # what the JIT does with an integer argument equal to 1
            signature[name], constexprs[name] = "constexpr", 1
        # The JIT marks 16-byte aligned pointers and integers that are multiples of 16 the same way.
        arg_names = spec.fn.arg_names
        attrs = {
            (arg_names.index(n),): [["tt.divisibility", 16]]
            for n, t in signature.items()
            if t.startswith("*") or n in spec.aligned_args
        }
        src = ASTSource(fn=spec.fn, signature=signature, constexprs=constexprs, attrs=attrs)
        options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
        if spec.maxnreg is not None:
            options["maxnreg"] = spec.maxnreg
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        reg, stack, _, local = resource_usage(compiled.asm["cubin"])
        report.registers, report.stack_bytes, report.local_bytes = reg, stack, local
        # Dynamic shared memory (what Triton allocates for tl.dot staging / reductions) is in the metadata.
        report.shared_bytes = int(compiled.metadata.shared)
        report.ok = True
    except Exception as exc:  # report every failure, keep compiling the rest
        report.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    return report


def all_specs(modules=None):
    from jomed_fast.kernels import KERNEL_MODULES

    for module_name in modules or KERNEL_MODULES:
        module = importlib.import_module(f"jomed_fast.kernels.{module_name}")
        for spec in module.aot_specs():
            yield module_name, spec


def compile_all(archs=ARCHS, modules=None, progress=True) -> list[CompileReport]:
    from tqdm import tqdm

    jobs = [(m, s, a) for m, s in all_specs(modules) for a in archs]
    reports = []
    for _, spec, arch in tqdm(jobs, desc="compiling", disable=not progress, file=sys.stderr):
        reports.append(compile_spec(spec, arch))
    return reports


def format_table(reports: list[CompileReport]) -> str:
    header = f"{'config':58s} {'sm':>3s} {'regs':>5s} {'smem B':>7s} {'spill B':>7s}  status"
    lines = [header, "-" * len(header)]
    for r in reports:
        if r.ok:
            status = "SPILLS" if r.spills else "ok"
            lines.append(
                f"{r.config:58s} {r.arch:>3d} {r.registers:>5d} {r.shared_bytes:>7d} {r.local_bytes + r.stack_bytes:>7d}  {status}"
            )
        else:
            lines.append(f"{r.config:58s} {r.arch:>3d} {'-':>5s} {'-':>7s} {'-':>7s}  FAILED {r.error}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jomed_fast.kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="SM versions (default: 89 90)")
    parser.add_argument("--modules", nargs="+", default=None, help="kernel modules (default: all)")
    parser.add_argument("--json", default=None, help="also write the reports as JSON to this path")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("error: TRITON_INTERPRET is set; unset it to compile kernels", file=sys.stderr)
        return 2
    import triton

    # First line: which Triton compiled, so a CI log shows the version that passed or failed.
    print(f"triton {triton.__version__} ({os.path.dirname(triton.__file__)})", flush=True)
    reports = compile_all(tuple(args.arch), args.modules)
    print(format_table(reports))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump([dataclasses.asdict(r) for r in reports], f, indent=1)
        os.replace(tmp, args.json)
    bad = [r for r in reports if not r.ok or r.spills]
    print(f"\n{len(reports) - len(bad)} of {len(reports)} configurations compiled without spills")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
