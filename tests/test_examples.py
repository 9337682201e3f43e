"""Every script in examples/ runs as a user would run it (``python examples/<name>.py`` from the
repository root, no arguments) and exits 0 within a minute; each checks its own outcome and exits
non-zero when it does not hold (ids differing from faiss, a loss or a recall that did not improve)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
# CI's 2-core machine runs the suite beside other work; one minute of the script's own time each
LIMIT_S = 180


def test_the_examples_exist():
    assert EXAMPLES, "examples/: expected runnable scripts, found none"


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(script):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "JOMED_FAST_BACKEND")}
    out = subprocess.run(
        [sys.executable, str(script.relative_to(ROOT))],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=LIMIT_S,
    )
    assert out.returncode == 0, f"{script.name} exited {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
