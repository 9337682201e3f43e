#!/usr/bin/env bash
# The AOT check (python -m jomed_fast.kernels.aot) under a chosen Triton release.
#   bash .ci/aot_triton.sh 3.7.1 [aot options, e.g. --json out.json]
# PyTorch's CUDA wheels pin their own Triton (torch 2.13 -> 3.7.x, 2.14 -> 3.8.x), so GPU users
# compile with those, not with the newest one in .venv; each generates different code, and ptxas
# spills differently. Exits non-zero on any spill, compile error or failed install.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 1 ]; then
    echo "usage: bash .ci/aot_triton.sh TRITON_VERSION [aot options], e.g. 3.7.1" >&2
    exit 2
fi
ver="$1"
shift
py=.venv/bin/python
[ -x "$py" ] || { echo "aot_triton.sh: $py not found; create the venv first (make install)" >&2; exit 2; }

# Installed beside, never into, the venv (.venv/ is git-ignored): the venv keeps its own Triton for
# the test suite, and --no-deps keeps pip from touching torch. Install to a temporary folder and
# rename, so an interrupted install never leaves a half-filled cache that looks complete.
dir=".venv/aot/triton-$ver"
if [ ! -d "$dir" ]; then
    mkdir -p .venv/aot
    tmp="$dir.tmp.$$"
    trap 'rm -rf "$tmp"' EXIT
    "$py" -m pip install --quiet --disable-pip-version-check --no-deps --target "$tmp" "triton==$ver"
    mv "$tmp" "$dir"
fi

# PYTHONPATH entries come before site-packages, so this Triton shadows the venv's; check that it
# really is the one imported before trusting a pass.
export PYTHONPATH="$PWD/$dir${PYTHONPATH:+:$PYTHONPATH}"
"$py" - "$ver" "$PWD/$dir" <<'EOF'
import sys, triton
ver, where = sys.argv[1], sys.argv[2]
if triton.__version__ != ver or not triton.__file__.startswith(where):
    sys.exit(f"aot_triton.sh: expected triton {ver} from {where}, imported {triton.__version__} from {triton.__file__}")
EOF
# The interpreter never compiles, and the AOT check refuses to run under it.
exec env -u TRITON_INTERPRET "$py" -m jomed_fast.kernels.aot "$@"
