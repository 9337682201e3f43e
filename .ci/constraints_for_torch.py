"""Print a constraints file for the torch installed here: as given, less its triton pin where this
torch requires a triton of its own (PyTorch's CUDA wheels pin one; the CPU wheels require none),
so that pip is never asked for two triton releases at once."""

import importlib.metadata
import re
import sys

if len(sys.argv) != 2:
    sys.exit("usage: constraints_for_torch.py CONSTRAINTS_FILE")
try:
    lines = open(sys.argv[1]).read().splitlines()
except OSError as exc:
    sys.exit(f"constraints_for_torch.py: cannot read {sys.argv[1]!r}: {exc.strerror}")
torch_pins_triton = any(re.match(r"triton\b", r) for r in importlib.metadata.requires("torch") or [])
for line in lines:
    if not (torch_pins_triton and re.match(r"triton==", line)):
        print(line)
