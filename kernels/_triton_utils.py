"""What every Triton kernel module shares: ``interpreter_enabled`` (``TRITON_INTERPRET=1``, defined
once in ``jomed_fast.ops._dispatch``, which chooses the backend) and ``AotSpec``, the description of
a shipped compile configuration that ``python -m jomed_fast.kernels.aot`` compiles for sm_89 / sm_90
without a GPU.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

from jomed_fast.ops._dispatch import interpreter_enabled

__all__ = ["AotSpec", "interpreter_enabled", "kernel_arguments"]


def kernel_arguments(fn: Any) -> list[tuple[str, bool]]:
    """(name, is it a ``tl.constexpr``) of each argument of a ``@triton.jit`` function, in order: read
    from its Python signature as Triton reads it (an annotation naming ``constexpr``), so it holds
    for a compiled and an interpreted kernel alike."""
    return [
        (p.name, p.annotation is not inspect.Parameter.empty and "constexpr" in str(p.annotation))
        for p in inspect.signature(fn.fn).parameters.values()
    ]


@dataclasses.dataclass(frozen=True)
class AotSpec:
    """One compile configuration a kernel ships: a launch, which ``python -m jomed_fast.kernels.aot``
    specialises with Triton's own JIT code and compiles offline.

    A spec describes its launch in one of two ways.

    launch: a callable that runs the module's launcher once on example tensors of a real workload
        (on the ``meta`` device: shapes, strides and dtypes without memory) and returns nothing; the
        one call it makes to ``fn`` is the launch, its constexprs and options (``num_warps``,
        ``num_stages``, ``maxnreg``) included. The other fields then stay at their defaults.
    in_flight_floor: the least share of the Little's-law need (bytes an SM must keep in flight to
        draw the memory's bandwidth) this configuration must keep in flight, for a kernel that streams
        memory; None for no floor. Either way of describing a launch may set it.

    Otherwise the launch is declared field by field, below, and ``aot`` builds it: meta tensors of
    the pointer dtypes, 1 for ``unit_args``, a multiple of 16 for ``aligned_args``, a size that is
    neither for every other integer.

    The kernel's signature (argument names and order, which are ``tl.constexpr``, which are
    pointers: the arguments named ``*_ptr``) is read from ``fn`` itself; a spec holds only what a
    launch chooses, and ``signature`` puts the two together. Checked when the spec is built: a
    ``ValueError`` naming the spec and the argument.

    dtypes: the element dtype of every pointer argument (``"fp16"``, ``"i64"``), and the type of a
        runtime scalar that is not an int (``"fp32"``, as the JIT types a Python float). Every other
        runtime argument is ``i32``, as the JIT types a Python int below 2**31.
    constexprs: the value of every ``tl.constexpr`` argument (block sizes, flags).
    unit_args: integer arguments (inner strides) that equal 1 for contiguous inputs; the runtime
        JIT specializes such a value into a constant, so the AOT build does the same.
    aligned_args: integer arguments that are multiples of 16 in real use (model widths such as the
        embedding dim, hidden size or vocabulary, strides made of them, and sizes the launcher
        rounds up to a block); the JIT marks such a value divisible by 16, which lets loads
        vectorize and changes register use, so the AOT build marks it too. Sizes that vary per
        call (batch, rows, k) stay unspecialized.
    maxnreg: the launch's ``maxnreg`` (PTX ``.maxnreg``), when the launcher passes one.
    Pointer arguments are compiled as 16-byte aligned, as the JIT specializes fresh torch
    allocations; together this is the variant a contiguous, freshly allocated input of real
    model widths runs.
    """

    name: str
    fn: Any  # a triton.JITFunction
    dtypes: dict[str, str] = dataclasses.field(default_factory=dict)
    constexprs: dict[str, Any] = dataclasses.field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    unit_args: tuple[str, ...] = ()
    aligned_args: tuple[str, ...] = ()
    maxnreg: int | None = None
    launch: Callable[[], object] | None = None
    in_flight_floor: float | None = None

    def __post_init__(self) -> None:
        where = f"AotSpec {self.name}"
        if self.in_flight_floor is not None and not 0 < self.in_flight_floor:
            raise ValueError(
                f"{where}: in_flight_floor: expected a positive share of the need, got {self.in_flight_floor}"
            )
        if self.launch is not None:
            declared = [f for f in ("dtypes", "constexprs", "unit_args", "aligned_args", "maxnreg") if getattr(self, f)]
            if declared:
                raise ValueError(
                    f"{where}: a spec with a launch takes its arguments and options from it, got {', '.join(declared)} too"
                )
            return
        arguments = kernel_arguments(self.fn)
        names = [n for n, _ in arguments]
        constexpr = [n for n, c in arguments if c]
        runtime_ints = [
            n for n, c in arguments if not c and not n.endswith("_ptr") and self.dtypes.get(n, "i32") in ("i32", "i64")
        ]
        for field in ("dtypes", "constexprs", "unit_args", "aligned_args"):
            for n in getattr(self, field):
                if n not in names:
                    raise ValueError(
                        f"{where}: {field} names {n!r}, expected an argument of {self.fn.fn.__name__} {names}"
                    )
        for n, _ in arguments:
            if n in constexpr and n not in self.constexprs:
                raise ValueError(f"{where}: constexprs: expected a value for the tl.constexpr argument {n!r}, got none")
            if n not in constexpr and n in self.constexprs:
                raise ValueError(f"{where}: constexprs: expected only tl.constexpr arguments, got {n!r}")
            if n in constexpr and n in self.dtypes:
                raise ValueError(f"{where}: dtypes: expected runtime arguments, got the tl.constexpr {n!r}")
            dtype = self.dtypes.get(n)
            if n.endswith("_ptr") and n not in constexpr and (not dtype or dtype.startswith("*")):
                raise ValueError(
                    f"{where}: dtypes: expected the element dtype of the pointer argument {n!r} "
                    f"(e.g. 'fp16'), got {dtype!r}"
                )
        for n in (*self.unit_args, *self.aligned_args):
            if n not in runtime_ints:
                raise ValueError(
                    f"{where}: unit_args / aligned_args name {n!r}, expected an integer argument, one of {runtime_ints}"
                )

    @property
    def signature(self) -> dict[str, str]:
        """Argument -> Triton type (``"*fp16"``, ``"i32"``, ``"fp32"``, ``"constexpr"``), in the
        kernel's order, as a declared spec types them (before the JIT turns ``unit_args`` into
        constants); a spec with a launch is typed by the JIT (``aot.jit_specialization``)."""
        if self.launch is not None:
            raise ValueError(f"AotSpec {self.name}: signature: a spec with a launch is typed by the JIT, not declared")
        types = {}
        for n, is_constexpr in kernel_arguments(self.fn):
            if is_constexpr:
                types[n] = "constexpr"
            elif n.endswith("_ptr"):
                types[n] = f"*{self.dtypes[n]}"
            else:
                types[n] = self.dtypes.get(n, "i32")
        return types
