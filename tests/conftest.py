"""Test configuration.

``TRITON_INTERPRET=1`` must be set before any Triton kernel module is imported, so it is set here,
at collection time: with it the Triton kernels run on CPU tensors under Triton's interpreter.
It changes nothing else: ops still dispatch CPU tensors to the torch path unless a test selects
the Triton backend (``JOMED_FAST_BACKEND=triton``, see the ``backend`` and ``use_backend`` fixtures).
"""

import contextlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs TEST_WORKERS processes side by side: one thread each keeps them off each
    # other's cores (the tiny models gain nothing from a second thread; see `one_thread`)
    torch.set_num_threads(1)

# the fault tests' module-scoped workspace fixtures (`files`, `full_run`); a module defining its own wins
pytest_plugins = ["_faults"]

# Per-dtype tolerances (atol, rtol) of the fast paths against a float64 reference, on log-probs
# and gradients of O(1) magnitude. fp16/bf16 inputs are rounded once on the way in; accumulation is fp32.
TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Run a test once per backend; the Triton one runs its kernels under the interpreter."""
    monkeypatch.setenv("JOMED_FAST_BACKEND", request.param)
    return request.param


@pytest.fixture(scope="session")
def use_backend():
    """``with use_backend("triton"): ...`` runs the block on that backend. For Hypothesis tests, which
    draw the backend per example and cannot take the function-scoped ``backend`` fixture."""

    @contextlib.contextmanager
    def use(name):
        with pytest.MonkeyPatch.context() as m:
            m.setenv("JOMED_FAST_BACKEND", name)
            yield

    return use


@pytest.fixture(scope="module")
def one_thread():
    """The tiny models' matmuls are too small to gain from a second thread, and on a busy machine
    (another process on the other core) OpenMP's join makes a 2-thread forward ~20x slower.
    Modules running tiny readers use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The suite's longest files, longest first (``pytest --durations``: the full demo ~300 s, then
# ~90, ~70 and ~30 s). ``make test`` hands files to its workers in collection order
# (``--dist loadfile --no-loadscope-reorder``; by default xdist starts the files with the most
# tests first, which put the one-test demo last, with one worker running it alone for 5 minutes),
# so these start first and the other worker takes the rest meanwhile.
LONGEST_FIRST = ("test_demo_findings.py", "test_topk_similarity.py", "test_aot.py", "test_examples.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: the rest keep their order
