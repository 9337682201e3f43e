#!/usr/bin/env bash
# The open_clip adapter's test environment: open_clip, timm and torchvision beside the project's
# CPU torch, in a folder put on PYTHONPATH (default .venv/openclip, git-ignored with .venv/).
#
# Why not a second virtual environment with a matching torch / torchvision pair: the public
# index's torchvision 0.28.0 is a CUDA build (its _C needs libtorch_cuda), and the CUDA torch
# 2.13.0 it pairs with brings the nvidia-* libraries: measured here, that environment took 448 s to
# install and 4.9 GB of disk. This folder took 10 s and 51 MB here: the packages open_clip's model
# code imports, without their dependencies (torch, numpy, pillow, regex, safetensors, tqdm,
# huggingface_hub and pyyaml come from .venv). torchvision's C++ ops stay unloaded, which
# open_clip never calls; tests/test_retriever_adapters.py declares the two op schemas torchvision
# 0.28 registers fake kernels for unguarded, so its Python transforms import.
#
# usage: bash .ci/openclip_env.sh [target folder]
#        PYTHONPATH=.venv/openclip .venv/bin/python -m pytest -q tests/test_retriever_adapters.py -k open_clip
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:-.venv/openclip}"
rm -rf "$target"
# === pins an exact version: the local tag of another build (e.g. +cpu) is not taken for it
.venv/bin/python -m pip install --quiet --no-deps --target "$target" \
    "torchvision===0.28.0" "open_clip_torch===3.3.0" "timm===1.0.31" "ftfy===6.3.1" "wcwidth===0.9.4"
