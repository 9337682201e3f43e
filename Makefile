# Two commands do all the set-up on a fresh machine (Python 3.11, CPU or CUDA):
#   make bench   create/reuse .venv, build everything, run the headline benchmark
#   make test    create/reuse .venv, build everything, lint and type-check, run the whole test suite
# torch is installed first (TORCH_SPEC from TORCH_INDEX), then the package with --no-build-isolation
# so that the C++ extension jomed_fast._C compiles against that torch, and with the exact releases
# of constraints.txt. Choices (see the README, "Install"):
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu     # CPU-only torch from PyTorch's index
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cu126   # a CUDA 12 build (drivers >= 525)
#   make test CONSTRAINTS=                                         # the newest releases in setup.py's ranges

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
CONSTRAINTS ?= constraints.txt
EXTRAS      ?= dev
STAMP       := $(VENV)/.jomed_fast_installed
# the AOT check also runs under these Triton releases: the ones torch 2.13 / 2.14's CUDA wheels pin
AOT_TRITONS ?= 3.7.1 3.8.0
# the suite runs its files over this many processes (pytest-xdist; one file's tests share a process,
# so its module fixtures are built once; tests/conftest.py puts the longest files first, and
# --no-loadscope-reorder starts them first); TEST_WORKERS=0 runs it in this process
TEST_WORKERS ?= 2

.PHONY: install bench bench-kernels gpu-check aot aot-tritons study lint test clean

install: $(STAMP)

$(STAMP): setup.py pyproject.toml constraints.txt $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip "setuptools>=70" wheel
	$(PY) -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(if $(CONSTRAINTS),$(PY) .ci/constraints_for_torch.py $(CONSTRAINTS) > $(VENV)/constraints.txt)
	$(PY) -m pip install --quiet --no-build-isolation $(if $(CONSTRAINTS),-c $(VENV)/constraints.txt) -e ".[$(EXTRAS)]"
	$(PY) -c "import torch, jomed_fast.packing as p; print('candidate packer:', *p.backend())"
	touch $(STAMP)

bench: install
	$(PY) bench/fusion_throughput.py

bench-kernels: install
	$(PY) bench/kernels.py

# one GPU: correctness, speed, index search, scoring throughput, memory planner -> docs/gpu/<device>.{json,md}
# (without a GPU: the dry run, which plans and checks every step)
gpu-check: install
	$(PY) bench/gpu_check.py

# the real-data study: BreastMNIST and RetinaMNIST from ../shared/data, 5 seeds, every system and
# baseline -> docs/study.{md,png,json} (2-2.5 min per BreastMNIST seed, ~4 per RetinaMNIST seed
# on 2 cores; runs/study resumes); STUDY_DATA is the folder holding breastmnist.npz and retinamnist.npz
STUDY_DATA ?= ../shared/data
study: install
	$(VENV)/bin/jomed-fast study --out runs/study --doc docs/study.md --data-dir $(STUDY_DATA)

aot: install
	$(PY) -m jomed_fast.kernels.aot

aot-tritons: install
	for v in $(AOT_TRITONS); do bash .ci/aot_triton.sh $$v || exit 1; done

# ruff's lint and format check (pyproject.toml: 120 columns), then mypy over jomed_fast/
lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

clean:
	rm -rf build *.egg-info jomed_fast/*.so jomed_fast/_build_info.py
