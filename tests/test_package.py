"""The package and its layers import on a CPU-only machine with no Triton variable set, without
importing Triton, bitsandbytes, faiss or the C++ extension; the extension of this dev install fits the running torch; the backend switch
behaves as documented."""

import os
import subprocess
import sys

import pytest
import torch

import jomed_fast
from jomed_fast.ops import _dispatch

# setup.py writes _build_info.py beside _C when it compiled it
_EXTENSION_BUILT = os.path.exists(os.path.join(os.path.dirname(jomed_fast.__file__), "_build_info.py"))


@pytest.mark.parametrize(
    "module",
    [
        "jomed_fast",
        "jomed_fast.ops",
        "jomed_fast.readers",
        "jomed_fast.index",
        "jomed_fast.scoring",
        "jomed_fast.train",
        "jomed_fast.infer",
        "jomed_fast.cli",
    ],
)
def test_import_loads_no_triton_bitsandbytes_faiss_or_extension(module):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRITON_", "JOMED_FAST_"))}
    heavy = ("triton", "bitsandbytes", "faiss", "jomed_fast._C")
    code = f"import sys, {module}; print(*[m in sys.modules for m in {heavy!r}])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert dict(zip(heavy, out.split())) == dict.fromkeys(heavy, "False")


@pytest.mark.skipif(
    not _EXTENSION_BUILT and os.environ.get("JOMED_FAST_REQUIRE_C") != "1",
    reason="jomed_fast._C was not built here (no compiler at install time); JOMED_FAST_REQUIRE_C=1 "
    "makes its absence a failure (CI sets it)",
)
def test_extension_loads_after_torch():
    """This dev install built jomed_fast._C against the running torch, and the packer would use it."""
    import jomed_fast._C

    import jomed_fast._build_info
    from jomed_fast import packing

    assert jomed_fast._build_info.TORCH_VERSION == torch.__version__  # recorded by setup.py
    assert packing._release(jomed_fast._C.TORCH_VERSION) == packing._release(torch.__version__)  # its headers
    assert packing._load_extension() == (jomed_fast._C, f"jomed_fast._C, built against torch {torch.__version__}")


def test_backend_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("JOMED_FAST_BACKEND", raising=False)
    assert _dispatch.choose_backend(cpu) == "torch"
    monkeypatch.setenv("JOMED_FAST_BACKEND", "torch")
    assert _dispatch.choose_backend(torch.device("cuda")) == "torch"
    monkeypatch.setenv("JOMED_FAST_BACKEND", "triton")
    assert _dispatch.choose_backend(cpu) == "triton"  # conftest set TRITON_INTERPRET=1
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _dispatch.choose_backend(cpu)
    monkeypatch.setenv("JOMED_FAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match="JOMED_FAST_BACKEND: expected one of"):
        _dispatch.choose_backend(cpu)


def test_top_level_entry_points_are_lazy():
    code = (
        "import sys, jomed_fast; before = 'jomed_fast.scoring' in sys.modules; "
        "from jomed_fast import CandidateScorer, Candidate, load_reader; "
        "import jomed_fast.scoring, jomed_fast.prompts, jomed_fast.readers; "
        "print(before, CandidateScorer is jomed_fast.scoring.CandidateScorer, "
        "Candidate is jomed_fast.prompts.Candidate, load_reader is jomed_fast.readers.load_reader, "
        "'CandidateScorer' in dir(jomed_fast))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True", "True", "True", "True"]
    import jomed_fast

    with pytest.raises(AttributeError, match="no attribute 'Scorer'"):
        jomed_fast.Scorer  # noqa: B018


def test_documented_import_paths_reach_the_modules_that_hold_the_code():
    """The names the README and the package docstrings give users (``from jomed_fast.readers import
    tiny, load_reader``, ``jomed_fast.candidate_retrieval.Retrieval``, the package re-exports) are the objects
    of the modules whose file names say what they hold."""
    from jomed_fast import analysis, candidate_retrieval, index, readers, retriever, scoring
    from jomed_fast.analysis import consistency, prediction_records
    from jomed_fast.readers import hf_reader, offline_checkpoints
    from jomed_fast.retriever import encoder_io, head_encoders, tiny_clip
    from jomed_fast.scoring import class_head, memory_budget

    assert readers.tiny is offline_checkpoints and readers.load_reader is hf_reader.load_reader
    assert candidate_retrieval.__all__ == ["Retrieval", "Retrieved"]
    assert index.Index.__module__ == "jomed_fast.index.opened"
    assert (retriever.TinyCLIP, retriever.load_encoder, retriever.HeadEncoders) == (
        tiny_clip.TinyCLIP,
        encoder_io.load_encoder,
        head_encoders.HeadEncoders,
    )
    assert (scoring.ClassHead, scoring.RowCost) == (class_head.ClassHead, memory_budget.RowCost)
    assert (analysis.PredictionRecord, analysis.oracle_accuracy) == (
        prediction_records.PredictionRecord,
        consistency.oracle_accuracy,
    )
