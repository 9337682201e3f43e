"""``python -m jomed_fast.index``: ``jomed-fast index-synthetic``, ``verify-index`` and ``index-cost``
under the names ``build-synthetic``, ``verify`` and ``cost``, with the same options and errors.

    python -m jomed_fast.index build-synthetic --records 100000 --out runs/ix100k
    torchrun --nproc-per-node 2 -m jomed_fast.index build-synthetic --records 100000 --out runs/ix100k
    python -m jomed_fast.index verify runs/ix100k --encoder runs/ix100k/encoder
    python -m jomed_fast.index cost
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

ALIASES = {"build-synthetic": "index-synthetic", "verify": "verify-index", "cost": "index-cost"}


def main(argv: Sequence[str] | None = None) -> int:
    from jomed_fast.cli import commands, run_commands

    table = commands()
    return run_commands(
        {alias: table[name] for alias, name in ALIASES.items()},
        argv,
        prog="python -m jomed_fast.index",
        description=__doc__.split("\n\n")[0],
    )


if __name__ == "__main__":
    sys.exit(main())
