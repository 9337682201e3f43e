"""Build and install jomed_fast.

Install torch==2.13.0 first, then ``pip install --no-build-isolation -e ".[dev]"`` so the C++
extension ``jomed_fast._C`` compiles against the torch that is already in the environment.
``kernels/`` is installed as the subpackage ``jomed_fast.kernels``: a top-level module named
``kernels`` would be mistaken by transformers for the Hugging Face hub-kernels package.
"""

import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _cxx_flags() -> list[str]:
    flags = ["-O3", "-std=c++17"]
    if os.environ.get("JOMED_FAST_NO_OPENMP") != "1":
        flags.append("-fopenmp")
    return flags


def _link_flags() -> list[str]:
    return [] if os.environ.get("JOMED_FAST_NO_OPENMP") == "1" else ["-fopenmp"]


CPP_SOURCES = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.cpp")))
if not CPP_SOURCES:
    raise SystemExit("csrc/: expected the C++ sources of jomed_fast._C (csrc/*.cpp), found none")

ext_modules = [
    CppExtension(
        name="jomed_fast._C",
        sources=CPP_SOURCES,
        extra_compile_args={"cxx": _cxx_flags()},
        extra_link_args=_link_flags(),
    )
]

setup(
    name="jomed_fast",
    version="0.1.0",
    description="Fast kernels and pipeline for LVLM-aware multimodal retrieval in RAG-based medical diagnosis (JOMED)",
    python_requires=">=3.10",
    packages=[
        "jomed_fast",
        *(f"jomed_fast.{p}" for p in find_packages("jomed_fast")),
        "jomed_fast.kernels",
    ],
    package_dir={"jomed_fast": "jomed_fast", "jomed_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.1; platform_system == 'Linux'",
        "numpy",
        "safetensors",
        "transformers>=5.0",
        "tokenizers",
        "peft",
        "bitsandbytes",
        "accelerate",
        "faiss-cpu",
        "tqdm",
        "matplotlib",
        "pyyaml",
        "pillow",
    ],
    extras_require={
        "dev": ["pytest", "hypothesis", "scikit-learn"],
        # GPU-only; never imported at module import time (see README, "GPU extras").
        "gpu": ["flash-attn", "cupy-cuda12x", "faiss-gpu"],
    },
    package_data={"jomed_fast.memory": ["configs/*.json"]},
    entry_points={"console_scripts": ["jomed-fast = jomed_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=False)},
)
