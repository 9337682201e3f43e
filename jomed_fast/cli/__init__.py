"""``jomed-fast``: the command line (one subcommand per pipeline step).

    jomed-fast build-index --records index.jsonl --encoder ENC --out IX
    jomed-fast train-reader --reader READER --train train.jsonl --index IX --encoder ENC --run-dir runs/s1
    jomed-fast train-retriever --reader READER --adapter runs/s1/adapter --train train.jsonl \
        --index IX --encoder ENC --run-dir runs/s2
    jomed-fast predict --config run.yaml --out preds.jsonl
    jomed-fast evaluate --predictions preds.jsonl
    jomed-fast analyze --system rag=rag.jsonl --system jomed=jomed.jsonl --out report/
    jomed-fast plan-memory --model qwen2_vl_7b
    jomed-fast demo --out runs/demo

Every subcommand takes ``--config run.yaml`` (its options as ``name: value``) and a flag per option
that overrides the file; ``jomed-fast <subcommand> --help`` lists them. Errors in the inputs (bad
option, missing file, bad data) print one line on stderr and exit with code 2; long steps resume
when rerun with the same options.
"""

from __future__ import annotations

import argparse
import sys

from .options import add_options, resolve

__all__ = ["commands", "main"]

# Errors that are the user's to fix: one line, exit 2 (anything else is a bug and keeps its traceback).
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, PermissionError)


def commands() -> dict:
    from . import demo, indexing, inference, training

    return {c.name: c for module in (indexing, training, inference, demo) for c in module.COMMANDS}


def _parser(table: dict) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jomed-fast", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    for c in table.values():
        p = sub.add_parser(c.name, help=c.help, description=c.description)
        add_options(p, c.options)
    sub.add_parser("plan-memory", help="predicted peak GPU memory of the three stages (--help for its options)",
                   add_help=False)
    return ap


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "plan-memory":  # its own parser (python -m jomed_fast.memory)
        from ..memory.cli import main as plan_memory

        return plan_memory(argv[1:])
    table = commands()
    ap = _parser(table)
    args = ap.parse_args(argv)
    if args.command is None:
        ap.print_help()
        return 2
    command = table[args.command]
    try:
        values = resolve(command.options, args)
        return int(command.run(values) or 0)
    except USER_ERRORS as exc:
        msg = " ".join(str(exc).split())
        print(f"jomed-fast {command.name}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jomed-fast {command.name}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
