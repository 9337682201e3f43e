"""Build and install jomed_fast.

The fast path: install torch first (torch==2.13.0 on a CPU machine), then
``pip install --no-build-isolation -e ".[dev]"``. The C++ extension ``jomed_fast._C`` (the
candidate packer) then compiles against the torch already in the environment, and the metadata
requires that torch's major.minor (e.g. ``torch>=2.13,<2.14``), the C++ ABI _C was compiled for.

The extension is optional. Without torch at build time (pip's default isolated build: pyproject.toml
lists no torch, since the newest torch that pip would fetch into the build environment need not be
the one the package runs with) or without a working C++ compiler, the install succeeds without
``_C``, keeps the plain torch requirement, and ``jomed_fast.packing`` runs its Python packer (same
output; ``jomed_fast.packing.backend()`` says which packer runs and why). Both are probed before
building, because PEP 517 fixes the metadata first; should the compile itself fail after the probe
passed, the install still succeeds without ``_C``, its metadata keeping the pin.

``kernels/`` is installed as the subpackage ``jomed_fast.kernels``: a top-level module named
``kernels`` would be mistaken by transformers for the Hugging Face hub-kernels package.
"""

import glob
import os
import re
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
EXTENSION = "jomed_fast._C"


def _cxx_flags() -> list[str]:
    # -g0 comes after Python's CFLAGS, which carry -g: debug info was 98% of _C's size. No -std:
    # torch's BuildExtension adds the standard its headers need (C++20 since torch 2.13; 2.14's
    # headers refuse C++17)
    flags = ["-O3", "-g0"]
    if os.environ.get("JOMED_FAST_NO_OPENMP") != "1":
        flags.append("-fopenmp")
    return flags


def _link_flags() -> list[str]:
    flags = [] if os.environ.get("JOMED_FAST_NO_OPENMP") == "1" else ["-fopenmp"]
    if sys.platform.startswith("linux"):
        flags.append("-s")  # no symbol table either: Python needs only the dynamic symbols
    return flags


def _why_no_extension() -> str | None:
    """Why _C cannot be built here, or None; asked before any build, since PEP 517 fixes a wheel's
    metadata (and so the torch pin) before building it."""
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import include_paths
    except Exception as error:  # not only ImportError: a broken torch must not fail the install either
        return f"torch's build helpers are unavailable ({type(error).__name__}: {error})"
    if not os.path.isfile(os.path.join(include_paths()[0], "torch", "extension.h")):
        return f"torch's C++ headers are missing ({include_paths()[0]}/torch/extension.h)"
    # the compiler, linker, flags and compiler check the build will use (CXX, CC, LDSHARED honoured)
    import subprocess
    import sysconfig
    import tempfile
    from distutils.ccompiler import new_compiler
    from distutils.sysconfig import customize_compiler

    compiler = new_compiler()
    customize_compiler(compiler)
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.cpp")
        with open(source, "w") as f:
            f.write("#include <Python.h>\nint probe() { return 0; }\n")  # Python's headers may be missing too
        try:
            objects = compiler.compile(
                [source], output_dir=tmp, include_dirs=[sysconfig.get_paths()["include"]], extra_postargs=_cxx_flags()
            )
            compiler.link_shared_object(
                objects, os.path.join(tmp, "probe.so"), extra_postargs=_link_flags(), target_lang="c++"
            )
            subprocess.run([compiler.compiler_cxx[0], "--version"], check=True, capture_output=True)
        except Exception as error:
            return f"no working C++ compiler ({type(error).__name__}: {error})"
    return None


WHY_NO_EXTENSION = _why_no_extension()
if WHY_NO_EXTENSION:
    print(
        f"setup.py: building without {EXTENSION}: {WHY_NO_EXTENSION}; jomed_fast.packing will run its Python packer",
        file=sys.stderr,
    )
else:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension


def _pin_torch(requirements: list[str]) -> list[str]:
    """With _C built: the torch entry becomes ``torch>=M.m,<M.(m+1)``, the torch _C compiles against."""
    if WHY_NO_EXTENSION:
        return requirements
    major, minor = (int(x) for x in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
    is_torch = re.compile(r"torch\s*(?:[<>=!~;\[(]|$)")  # "torch>=2.4", not "torchvision"
    return [f"torch>={major}.{minor},<{major}.{minor + 1}" if is_torch.match(r) else r for r in requirements]


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class BuildPyWithoutBuildInfo(build_py):
    """build_py, leaving out a ``jomed_fast/_build_info.py`` that an in-place build left in the source
    tree: only the build that compiles _C may put one beside it, or a wheel without _C would carry it."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if (m[0], m[1]) != ("jomed_fast", "_build_info")]


ext_modules, cmdclass = [], {"build_py": BuildPyWithoutBuildInfo}
if not WHY_NO_EXTENSION:
    CPP_SOURCES = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.cpp")))
    if not CPP_SOURCES:
        raise SystemExit(f"csrc/: expected the C++ sources of {EXTENSION} (csrc/*.cpp), found none")
    ext_modules.append(
        CppExtension(
            name=EXTENSION,
            sources=CPP_SOURCES,
            extra_compile_args={"cxx": _cxx_flags()},
            extra_link_args=_link_flags(),
        )
    )

    class BuildOptionalExtension(BuildExtension):
        """torch's BuildExtension, where a failed build of _C leaves a working pure-Python install.

        On success it writes ``_build_info.py`` next to ``_C``: the torch it was compiled against,
        which jomed_fast.packing checks before loading it.
        """

        def finalize_options(self):
            super().finalize_options()
            # distutils skips an extension that is newer than its sources, but _C also depends on
            # the installed torch, which that check cannot see: always compile
            self.force = True

        def build_extensions(self):
            # Extension(optional=True) would catch only compiler errors; torch's compiler checks
            # raise others (CalledProcessError for a compiler that fails on -v), hence the broad catch
            try:
                super().build_extensions()
            except Exception as error:
                print(
                    f"setup.py: building {EXTENSION} failed ({type(error).__name__}: {error}); installing "
                    f"without it, jomed_fast.packing will run its Python packer",
                    file=sys.stderr,
                )
                # the build directory may hold an earlier build's _C: it must not reach a wheel
                # (run() builds there even for --inplace, and copies in place afterwards)
                built = self.get_ext_fullpath(EXTENSION)
                for path in (built, os.path.join(os.path.dirname(built), "_build_info.py")):
                    if os.path.exists(path):
                        os.remove(path)
                self.extensions = []  # nothing to copy in place or to list as an output

        def run(self):
            super().run()
            if not self.extensions:
                return
            # after super().run() the path is the source tree's for --inplace and editable installs
            info = os.path.join(os.path.dirname(self.get_ext_fullpath(EXTENSION)), "_build_info.py")
            _write_atomically(
                info,
                "# Written by setup.py when it compiled jomed_fast._C; not in git. The torch _C\n"
                "# was compiled against, checked by jomed_fast.packing before it loads _C.\n"
                f"TORCH_VERSION = {torch.__version__!r}\n",
            )

    cmdclass["build_ext"] = BuildOptionalExtension.with_options(use_ninja=False)

setup(
    name="jomed_fast",
    version="0.1.0",
    description="Fast kernels and pipeline for LVLM-aware multimodal retrieval in RAG-based medical diagnosis (JOMED)",
    license="Apache-2.0",
    license_files=["LICENSE"],
    python_requires=">=3.10",
    packages=[
        "jomed_fast",
        *(f"jomed_fast.{p}" for p in find_packages("jomed_fast")),
        "jomed_fast.kernels",
    ],
    package_dir={"jomed_fast": "jomed_fast", "jomed_fast.kernels": "kernels"},
    # Bounded to the releases the suite has passed on (the README lists them; constraints.txt pins
    # the exact set .ci/run installs). Triton: the range the AOT check passes under, which holds the
    # releases torch's CUDA wheels pin (torch 2.13: 3.7, torch 2.14: 3.8).
    install_requires=_pin_torch(
        [
            "torch>=2.13,<2.15",
            "triton>=3.7,<3.10; platform_system == 'Linux'",
            "transformers>=5.24,<5.25",  # 5.24 renamed the decoders' past_key_values to cache; 5.25 needs the hub-kernels package
            "peft>=0.21,<0.22",
            "bitsandbytes>=0.50,<0.51",  # readers.quantization drives its CPU kernel choice
            "accelerate>=1.16,<2",
            "numpy>=2.0",
            "safetensors",
            "tokenizers",
            "tqdm",
            "matplotlib",
            "pyyaml",
            "pillow",
        ]
    ),
    extras_require={
        # faiss-cpu and faiss-gpu install the same module: alternatives, neither required (the
        # project's own top-k serves exact search); the tests compare against faiss-cpu
        "faiss-cpu": ["faiss-cpu>=1.15,<1.16"],
        "faiss-gpu": ["faiss-gpu>=1.15,<1.16"],
        # jomed-fast study: the supervised baselines' logistic regression and metrics
        "study": ["scikit-learn"],
        "dev": [
            "pytest",
            "pytest-xdist",  # make test: the suite's files over TEST_WORKERS processes
            "hypothesis",
            "scikit-learn",
            "faiss-cpu>=1.15,<1.16",
            "tensorboard",
            "ruff",
            "mypy",
            "types-PyYAML",
            "types-tqdm",
        ],
    },
    package_data={"jomed_fast.memory": ["configs/*.json"]},
    entry_points={"console_scripts": ["jomed-fast = jomed_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
