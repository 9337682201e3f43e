# Two commands do all the set-up on a fresh machine (Python 3.11, CPU or CUDA):
#   make bench   create/reuse .venv, build everything, run the headline benchmark
#   make test    create/reuse .venv, build everything, run the whole test suite
# torch==2.13.0 is installed first: on a CPU machine that is the CPU build (a looser spec pulls a
# multi-GB CUDA build); the package is then installed with --no-build-isolation so the C++
# extension jomed_fast._C compiles against that torch.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.jomed_fast_installed

.PHONY: install bench bench-kernels aot test clean

install: $(STAMP)

$(STAMP): setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip "setuptools>=70" wheel
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --no-build-isolation -e ".[dev]"
	$(PY) -c "import torch, jomed_fast._C"
	touch $(STAMP)

bench: install
	$(PY) bench/fusion_throughput.py

bench-kernels: install
	$(PY) bench/kernels.py

aot: install
	$(PY) -m jomed_fast.kernels.aot

test: install
	$(PY) -m pytest -q

clean:
	rm -rf build *.egg-info jomed_fast/*.so
