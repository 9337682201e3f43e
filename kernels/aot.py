"""Compile every shipped Triton kernel configuration for the target GPUs, with no GPU present, as the
JIT would compile it for a real launch, and report what it costs on chip.

    python -m jomed_fast.kernels.aot [--arch 89 90] [--modules ...] [--jobs N] [--json PATH]

**What is compiled.** Each ``AotSpec`` that a module in ``jomed_fast.kernels.KERNEL_MODULES``
returns from ``aot_specs()`` stands for one launch: either the module's own launcher run on example
tensors of the paper's shapes (``AotSpec.launch``; the tensors live on the ``meta`` device, so a
152064 x 3584 head costs no memory) or, for a spec that declares its arguments field by field, one
launch built from those fields (a 16-divisible value for each ``aligned_args``, 1 for each
``unit_args``, a size that is neither for every other integer). The launch's arguments go through
Triton's own specialisation, the code ``JITFunction.run`` calls to build its cache key
(``create_function_from_signature``'s binder, then ``JITFunction._pack_args``): it types every
argument, turns an integer equal to 1 into a constant, marks 16-byte aligned pointers and
integers that are multiples of 16 ``tt.divisibility = 16``, and parses the launch options
(``num_warps``, ``num_stages``, ``maxnreg``). ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`` then builds exactly that variant for sm_89 (L40) and sm_90
(H100 / H200); the report keeps the signature, constants and divisible arguments it compiled, so a
test can compare them with what ``JITFunction.run`` itself derives for the same launch. The same
calls exist in Triton 3.7.1, 3.8.0 and 3.9.0; the launch options that ``run`` adds from Triton's
knobs are read where the release has them.

**Registers, shared memory, spills** are read from the cubin with the ``cuobjdump -res-usage`` that
Triton bundles; shared memory is the compiled kernel's allocation (``metadata.shared``).

**Occupancy** (resident CTAs per SM) is the least of four limits, the way the CUDA occupancy
calculator computes it:

* registers: a warp holds ``ceil(32 * regs / 256) * 256`` registers of the SM's 65536, and a CTA
  ``num_warps`` warps;
* shared memory: a CTA holds its allocation rounded up to 128 B plus the 1 KB the driver reserves
  per CTA, of the SM's 100 KB (sm_89) or 228 KB (sm_90); more than 99 KB / 227 KB does not launch;
* warps: 48 (sm_89) or 64 (sm_90) per SM;
* CTAs: 24 (sm_89) or 32 (sm_90) per SM.

**Bytes in flight per SM** are read from the SASS (``cuobjdump -sass``). The main loop is the
backward branch whose body issues the most global-load bytes (the whole kernel when it has no
loop). Its body is walked twice, in program order (the second pass sees the loads a software
pipeline leaves in flight across the back edge), tracking what each thread has outstanding:

* ``LDG`` (into registers): outstanding from issue until the first instruction that reads one of
  its destination registers; loads complete in order, so that read retires it and every older one;
* ``LDGSTS`` (``cp.async``, global to shared): outstanding in its commit group (``LDGDEPBAR``)
  until a ``DEPBAR.LE SB0, n`` leaves only the ``n`` newest groups;
* widths from the opcode (``.128`` 16 B, ``.64`` 8 B, ``.U16`` / ``.S16`` 2 B, ``.U8`` / ``.S8``
  1 B, else 4 B). Bulk and TMA copies (``UBLKCP``, ``UTMALDG``) take their size from a descriptor
  the SASS does not show; they are counted (``bulk_copies``) and add no bytes.

The peak outstanding bytes per thread, times the CTA's threads, is what a CTA keeps in flight; times
the resident CTAs, what an SM keeps in flight. It is set against Little's law, the bytes an SM must
keep in flight to draw the memory's bandwidth: ``bandwidth x latency / SMs`` (``NEED``: L40, 864 GB/s
x 0.6 us / 142 SMs = 3.57 KiB for sm_89; H200, 4.8 TB/s x 0.7 us / 132 SMs = 24.9 KiB for sm_90, of
which an H100 SXM at 3.35 TB/s needs 70%). The ratio is a prediction from the static code, not a
measurement: predicated-off loads count, and latency under load is longer than idle latency. A spec
may declare a floor on that ratio (``AotSpec.in_flight_floor``); the report states it and whether it
holds.

The first line printed names the Triton version and where it was imported from. Exit status 1 when
any configuration fails to compile or spills. Run it without ``TRITON_INTERPRET``: under the
interpreter kernels are not compiled.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from typing import Any

ARCHS = (89, 90)  # sm_89: L40 / L40S / RTX 4090; sm_90: H100 / H200


@dataclasses.dataclass(frozen=True)
class SmLimits:
    """What one SM offers resident CTAs (CUDA C Programming Guide, compute capability table)."""

    registers: int
    shared_bytes: int  # per SM, the driver's per-CTA reserve included
    shared_per_cta: int  # the most one CTA may allocate
    warps: int
    ctas: int
    reserved_shared_per_cta: int = 1024
    register_granularity: int = 256  # registers are allocated per warp in units of 256
    shared_granularity: int = 128


SM_LIMITS = {
    89: SmLimits(registers=65536, shared_bytes=100 * 1024, shared_per_cta=99 * 1024, warps=48, ctas=24),
    90: SmLimits(registers=65536, shared_bytes=228 * 1024, shared_per_cta=227 * 1024, warps=64, ctas=32),
}


@dataclasses.dataclass(frozen=True)
class MemorySystem:
    """The GPU an arch is judged on: Little's law gives the bytes each SM must keep in flight."""

    gpu: str
    bandwidth: float  # bytes / s
    latency: float  # s, idle DRAM latency
    sms: int

    @property
    def need_per_sm(self) -> float:
        return self.bandwidth * self.latency / self.sms


NEED = {
    89: MemorySystem("L40", 864e9, 0.6e-6, 142),
    90: MemorySystem("H200", 4.8e12, 0.7e-6, 132),
}


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
    # What was compiled: the JIT's specialisation of the spec's launch.
    signature: dict[str, str] | None = None
    constants: dict[str, Any] | None = None
    divisible: list[str] | None = None  # arguments compiled with tt.divisibility 16
    num_warps: int | None = None
    num_stages: int | None = None
    maxnreg: int | None = None
    # Occupancy and bytes in flight (see the module docstring).
    ctas_per_sm: int | None = None
    warps_per_sm: int | None = None
    occupancy_limit: str | None = None
    in_flight_per_thread: int | None = None
    in_flight_per_sm: int | None = None
    bulk_copies: int | None = None
    need_per_sm: float | None = None
    in_flight_ratio: float | None = None
    in_flight_floor: float | None = None

    @property
    def spills(self) -> bool:
        return bool(self.local_bytes) or bool(self.stack_bytes)

    @property
    def below_floor(self) -> bool:
        return self.in_flight_floor is not None and (self.in_flight_ratio or 0.0) < self.in_flight_floor


def cuobjdump_path() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump: expected it in Triton's bundled NVIDIA tools at {path}, found nothing")
    return path


def _cuobjdump(flag: str, cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([cuobjdump_path(), flag, f.name], check=True, capture_output=True, text=True).stdout


_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def resource_usage(cubin: bytes) -> tuple[int, int, int, int]:
    """(registers, stack, shared, local) bytes of the single kernel in ``cubin``, via cuobjdump -res-usage."""
    text = _cuobjdump("-res-usage", cubin)
    match = _RES_USAGE.search(text)
    if match is None:
        raise RuntimeError(f"cuobjdump -res-usage: expected a 'REG:.. STACK:.. SHARED:.. LOCAL:..' line, got {text!r}")
    reg, stack, shared, local = (int(g) for g in match.groups())
    return reg, stack, shared, local


# ---- occupancy -------------------------------------------------------------------------------------


def occupancy(registers: int, shared_bytes: int, num_warps: int, arch: int) -> tuple[int, str]:
    """(resident CTAs per SM, the limit that binds: "registers" / "shared" / "warps" / "ctas")."""
    sm = SM_LIMITS[arch]
    if shared_bytes > sm.shared_per_cta:
        return 0, "shared"
    per_warp = math.ceil(32 * registers / sm.register_granularity) * sm.register_granularity
    shared = math.ceil(shared_bytes / sm.shared_granularity) * sm.shared_granularity + sm.reserved_shared_per_cta
    # On a tie the first named binds: the fixed limits before the ones the kernel chooses.
    limits = {"ctas": sm.ctas, "warps": sm.warps // num_warps, "registers": (sm.registers // per_warp) // num_warps}
    if shared_bytes:
        limits["shared"] = sm.shared_bytes // shared
    limit = min(limits, key=lambda k: limits[k])
    return limits[limit], limit


# ---- bytes in flight from the SASS -----------------------------------------------------------------

_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_REGISTER = re.compile(r"(?<![A-Z0-9_])R(\d+)(\.64)?\b")
_NO_DESTINATION = ("ST", "STG", "STS", "STL", "RED", "BRA", "BAR", "EXIT", "RET", "BSYNC", "BSSY", "CALL", "WARPSYNC")


@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


def parse_sass(text: str) -> list[Instruction]:
    return [
        Instruction(int(m.group(1), 16), m.group(2), m.group(3).strip())
        for m in (_SASS_LINE.search(line) for line in text.splitlines())
        if m is not None
    ]


def _width(opcode: str) -> int:
    parts = opcode.split(".")[1:]
    for token, nbytes in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if token in parts:
            return nbytes
    return 4


def _registers(text: str) -> set[int]:
    regs = set()
    for m in _REGISTER.finditer(text):
        regs.add(int(m.group(1)))
        if m.group(2):
            regs.add(int(m.group(1)) + 1)
    return regs


def _split_operands(ins: Instruction) -> tuple[set[int], set[int]]:
    """(registers written, registers read) of one instruction, the first operand being its destination
    unless the opcode writes no register."""
    operands = [o.strip() for o in ins.operands.split(",")] if ins.operands else []
    if not operands or ins.base in _NO_DESTINATION or ins.base == "LDGSTS":
        return set(), _registers(ins.operands)
    return _registers(operands[0]), _registers(",".join(operands[1:]))


def _global_load_bytes(ins: Instruction) -> int:
    return _width(ins.opcode) if ins.base in ("LDG", "LDGSTS") else 0


def main_loop(code: list[Instruction]) -> list[Instruction]:
    """The body of the backward branch that issues the most global-load bytes; the whole kernel if none."""
    best, best_bytes = code, -1
    for i, ins in enumerate(code):
        if ins.base != "BRA":
            continue
        target = re.search(r"0x([0-9a-f]+)", ins.operands)
        if target is None or int(target.group(1), 16) > ins.address:
            continue
        start = int(target.group(1), 16)
        body = [x for x in code[: i + 1] if x.address >= start]
        nbytes = sum(_global_load_bytes(x) for x in body)
        if nbytes > best_bytes or (nbytes == best_bytes and len(body) < len(best)):
            best, best_bytes = body, nbytes
    return best if best_bytes > 0 else code


def in_flight_per_thread(sass: str) -> tuple[int, int]:
    """(peak global-load bytes one thread keeps outstanding in the main loop, bulk / TMA copies there)."""
    code = parse_sass(sass)
    loop = main_loop(code)
    passes = 2 if loop is not code else 1
    pending: list[tuple[int, set[int]]] = []  # LDG in flight: (bytes, destination registers), oldest first
    groups: list[int] = []  # committed LDGSTS groups' bytes, oldest first
    open_group = 0
    peak = 0
    for ins in loop * passes:
        writes, reads = _split_operands(ins)
        # A read of a pending load's register waits for it, and so for every older load.
        waited = [j for j, (_, regs) in enumerate(pending) if regs & reads]
        if waited:
            del pending[: waited[-1] + 1]
        if ins.base == "LDG":
            # The destination names its first register; a 64- or 128-bit load fills 2 or 4.
            first = min(writes) if writes else -1
            pending.append((_width(ins.opcode), set(range(first, first + max(1, _width(ins.opcode) // 4)))))
        elif ins.base == "LDGSTS":
            open_group += _width(ins.opcode)
        elif ins.base == "LDGDEPBAR":
            groups.append(open_group)
            open_group = 0
        elif ins.base == "DEPBAR":
            keep = re.search(r"SB0,\s*0x([0-9a-f]+)", ins.operands)
            if keep is not None:
                n = int(keep.group(1), 16)
                groups = groups[len(groups) - n :] if n else []
        peak = max(peak, sum(b for b, _ in pending) + sum(groups) + open_group)
    bulk = sum(1 for ins in loop if ins.base in ("UBLKCP", "UTMALDG"))
    return peak, bulk


# ---- the launch each spec describes, and the JIT's specialisation of it ------------------------------


@dataclasses.dataclass
class Launch:
    """One call ``fn[grid](*args, **kwargs)``: runtime arguments, constexprs and launch options."""

    args: tuple
    kwargs: dict[str, Any]


_TORCH_DTYPES = {
    "fp16": "float16",
    "bf16": "bfloat16",
    "fp32": "float32",
    "fp64": "float64",
    "i64": "int64",
    "i32": "int32",
    "i16": "int16",
    "i8": "int8",
    "u8": "uint8",
    "i1": "bool",
}
# A per-call size (batch, rows, k) in a declared spec: neither 1 nor a multiple of 16, so the JIT
# leaves it a plain integer; a model width is a multiple of 16 (D = 768). i64 arguments pass 2**31.
_DECLARED_INTS = {"i32": (1001, 768), "i64": (2**31 + 1, 2**32)}


def captured_launch(spec) -> Launch:
    """Run ``spec.launch`` with the kernel's ``run`` replaced by a recorder: the one call the launcher
    makes is the launch (nothing is compiled or run)."""
    calls: list[Launch] = []

    def record(*args, grid, warmup, **kwargs):
        calls.append(Launch(args, kwargs))

    spec.fn.run = record  # an instance attribute shadows JITFunction.run for the call
    try:
        spec.launch()
    finally:
        del spec.fn.run
    if len(calls) != 1:
        raise ValueError(f"AotSpec {spec.name}: launch: expected one call of {spec.fn.fn.__name__}, got {len(calls)}")
    return calls[0]


def declared_launch(spec) -> Launch:
    """The launch a field-by-field spec declares (see ``AotSpec``): meta tensors of the pointer dtypes,
    1 for ``unit_args``, a multiple of 16 for ``aligned_args``, a plain size for other integers."""
    import torch

    from ._triton_utils import kernel_arguments

    kwargs: dict[str, Any] = {}
    for name, is_constexpr in kernel_arguments(spec.fn):
        dtype = spec.dtypes.get(name, "i32")
        if is_constexpr:
            kwargs[name] = spec.constexprs[name]
        elif name.endswith("_ptr"):
            kwargs[name] = torch.empty(16, dtype=getattr(torch, _TORCH_DTYPES[dtype]), device="meta")
        elif dtype.startswith(("fp", "bf")):
            kwargs[name] = 0.5
        else:
            plain, aligned = _DECLARED_INTS[dtype]
            kwargs[name] = 1 if name in spec.unit_args else aligned if name in spec.aligned_args else plain
    kwargs.update(num_warps=spec.num_warps, num_stages=spec.num_stages)
    if spec.maxnreg is not None:
        kwargs["maxnreg"] = spec.maxnreg
    return Launch((), kwargs)


def spec_launch(spec) -> Launch:
    return captured_launch(spec) if spec.launch is not None else declared_launch(spec)


def run_options(fn) -> dict[str, Any]:
    """The options ``JITFunction.run`` adds to a launch's keyword arguments from Triton's knobs (each
    release adds its own set; only those it has are read)."""
    from triton import knobs

    options: dict[str, Any] = {"debug": getattr(fn, "debug", None) or knobs.runtime.debug}
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, name):
            options[name] = getattr(knobs.compilation, name)
    return options


def jit_specialization(fn, launch: Launch, arch: int):
    """(target, options, signature, constexprs, attrs) as ``JITFunction.run`` derives them for this
    launch on a ``GPUTarget("cuda", arch, 32)``: its binder, then ``_pack_args``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**launch.kwargs, **run_options(fn)}
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return target, options, signature, constexprs, attrs


def json_value(value: Any) -> Any:
    """A constexpr's value as JSON keeps it (dtypes and other objects by their str)."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


_TTIR_ARGUMENT = re.compile(r"%\w+: [^,{()]+(?:\([^)]*\))?[^,{()]*?(?: \{([^}]*)\})?(?= loc\(|,|\))")


def compiled_specialization(fn, compiled) -> tuple[dict[str, str], dict[str, Any], list[str]]:
    """(signature, constants by argument name, arguments compiled with ``tt.divisibility = 16``) of a
    compiled kernel: the signature and constants it was built from, the divisibility read back from
    its TTIR's function arguments (the runtime arguments, in order)."""
    names = fn.arg_names
    signature = dict(compiled.src.signature)
    constants = {names[path[0]]: json_value(v) for path, v in compiled.src.constants.items() if len(path) == 1}
    header = next(line for line in compiled.asm["ttir"].splitlines() if "tt.func" in line)
    header = header[header.index("(") + 1 :]
    attributes = [m.group(1) or "" for m in _TTIR_ARGUMENT.finditer(header)]
    runtime = [n for n, t in signature.items() if t != "constexpr"]
    if len(attributes) != len(runtime):
        raise RuntimeError(
            f"TTIR of {fn.fn.__name__}: expected {len(runtime)} runtime arguments, read {len(attributes)}"
        )
    divisible = [n for n, a in zip(runtime, attributes) if "tt.divisibility = 16" in a]
    return signature, constants, sorted(divisible)


def in_flight_floor(spec) -> float | None:
    return getattr(spec, "in_flight_floor", None)


def compile_spec(spec, arch: int) -> CompileReport:
    import triton
    from triton.compiler import ASTSource

    kernel = spec.fn.fn.__name__
    report = CompileReport(kernel=kernel, config=spec.name, arch=arch, ok=False, triton=triton.__version__)
    try:
        target, options, signature, constexprs, attrs = jit_specialization(spec.fn, spec_launch(spec), arch)
        report.num_warps, report.num_stages = options.num_warps, options.num_stages
        report.maxnreg = getattr(options, "maxnreg", None)
        src = ASTSource(fn=spec.fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=target, options=options.__dict__)
        report.signature, report.constants, report.divisible = compiled_specialization(spec.fn, compiled)
        cubin = compiled.asm["cubin"]
        reg, stack, _, local = resource_usage(cubin)
        report.registers, report.stack_bytes, report.local_bytes = reg, stack, local
        # Dynamic shared memory (what Triton allocates for tl.dot staging / reductions) is in the metadata.
        report.shared_bytes = int(compiled.metadata.shared)
        report.ctas_per_sm, report.occupancy_limit = occupancy(reg, report.shared_bytes, options.num_warps, arch)
        report.warps_per_sm = report.ctas_per_sm * options.num_warps
        per_thread, report.bulk_copies = in_flight_per_thread(_cuobjdump("-sass", cubin))
        report.in_flight_per_thread = per_thread
        report.in_flight_per_sm = per_thread * 32 * options.num_warps * report.ctas_per_sm
        report.need_per_sm = NEED[arch].need_per_sm
        report.in_flight_ratio = report.in_flight_per_sm / report.need_per_sm
        report.in_flight_floor = in_flight_floor(spec)
        report.ok = True
    except Exception as exc:  # report every failure, keep compiling the rest
        report.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    return report


def all_specs(modules=None):
    """(module name, index in its ``aot_specs()``, spec) of every shipped configuration, in order."""
    from jomed_fast.kernels import KERNEL_MODULES

    for module_name in modules or KERNEL_MODULES:
        module = importlib.import_module(f"jomed_fast.kernels.{module_name}")
        for index, spec in enumerate(module.aot_specs()):
            yield module_name, index, spec


def _compile_job(module_name: str, index: int, arch: int) -> CompileReport:
    # In a worker process: specs hold kernels and callables, so each worker builds its own.
    spec = importlib.import_module(f"jomed_fast.kernels.{module_name}").aot_specs()[index]
    return compile_spec(spec, arch)


def compile_all(archs=ARCHS, modules=None, progress=True, jobs: int = 1) -> list[CompileReport]:
    """Every spec x arch, in order; ``jobs`` worker processes compile side by side (LLVM and ptxas
    compile one kernel on one core)."""
    from tqdm import tqdm

    work = [(m, i, arch, spec) for m, i, spec in all_specs(modules) for arch in archs]
    bar = tqdm(total=len(work), desc="compiling", disable=not progress, file=sys.stderr)
    if jobs <= 1:
        reports = []
        for _, _, arch, spec in work:
            reports.append(compile_spec(spec, arch))
            bar.update()
        bar.close()
        return reports
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_compile_job, m, i, a) for m, i, a, _ in work]
        for _ in concurrent.futures.as_completed(futures):
            bar.update()
    bar.close()
    return [f.result() for f in futures]


def format_table(reports: list[CompileReport]) -> str:
    header = (
        f"{'config':58s} {'sm':>3s} {'regs':>4s} {'smem B':>6s} {'spill B':>7s} {'CTA/SM':>6s} {'warp/SM':>7s} "
        f"{'limit':>9s} {'B/thr':>5s} {'KB/SM':>6s} {'need KB':>7s} {'ratio':>5s}  status"
    )
    lines = [header, "-" * len(header)]
    for r in reports:
        if r.ok:
            status = "SPILLS" if r.spills else "ok"
            if r.in_flight_floor is not None:
                status += f", {'BELOW' if r.below_floor else 'meets'} floor {r.in_flight_floor:.2f}"
            if r.bulk_copies:
                status += f", {r.bulk_copies} bulk copies uncounted"
            lines.append(
                f"{r.config:58s} {r.arch:>3d} {r.registers:>4d} {r.shared_bytes:>6d} "
                f"{r.local_bytes + r.stack_bytes:>7d} {r.ctas_per_sm:>6d} {r.warps_per_sm:>7d} "
                f"{r.occupancy_limit:>9s} {r.in_flight_per_thread:>5d} {r.in_flight_per_sm / 1024:>6.1f} "
                f"{r.need_per_sm / 1024:>7.2f} {r.in_flight_ratio:>5.2f}  {status}"
            )
        else:
            lines.append(f"{r.config:58s} {r.arch:>3d} {'-':>4s}  FAILED {r.error}")
    notes = [
        f"sm_{a}: need = {m.gpu} {m.bandwidth / 1e9:.0f} GB/s x {m.latency * 1e6:.1f} us / {m.sms} SMs"
        for a, m in NEED.items()
    ]
    return "\n".join(lines + [""] + notes)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jomed_fast.kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arch",
        type=int,
        nargs="+",
        default=list(ARCHS),
        choices=sorted(SM_LIMITS),
        help="SM versions (default: 89 90)",
    )
    parser.add_argument("--modules", nargs="+", default=None, help="kernel modules (default: all)")
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes (default: one per CPU)"
    )
    parser.add_argument("--json", default=None, help="also write the reports as JSON to this path")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("error: TRITON_INTERPRET is set; unset it to compile kernels", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"error: --jobs: expected a positive number of processes, got {args.jobs}", file=sys.stderr)
        return 2
    import triton

    # First line: which Triton compiled, so a CI log shows the version that passed or failed.
    print(f"triton {triton.__version__} ({os.path.dirname(triton.__file__)})", flush=True)
    reports = compile_all(tuple(args.arch), args.modules, jobs=args.jobs)
    print(format_table(reports))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump([dataclasses.asdict(r) for r in reports], f, indent=1)
        os.replace(tmp, args.json)
    bad = [r for r in reports if not r.ok or r.spills]
    below = [r for r in reports if r.ok and r.below_floor]
    print(f"\n{len(reports) - len(bad)} of {len(reports)} configurations compiled without spills")
    if below:
        print(
            f"{len(below)} below their bytes-in-flight floor: "
            + ", ".join(sorted({f"{r.config} sm_{r.arch}" for r in below}))
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
