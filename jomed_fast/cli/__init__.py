r"""``jomed-fast``: the command line (one subcommand per pipeline step).

    jomed-fast build-index --records index.jsonl --encoder ENC --out IX
    jomed-fast train-reader --reader READER --train train.jsonl --index IX --encoder ENC --run-dir runs/s1
    jomed-fast train-retriever --reader READER --adapter runs/s1/adapter --train train.jsonl \
        --index IX --encoder ENC --run-dir runs/s2
    jomed-fast predict --config run.yaml --out preds.jsonl
    jomed-fast evaluate --predictions preds.jsonl
    jomed-fast analyze --system rag=rag.jsonl --system jomed=jomed.jsonl --out report/
    jomed-fast plan-memory --model qwen2_vl_7b
    jomed-fast demo --out runs/demo
    jomed-fast study --out runs/study --doc docs/study.md   # BreastMNIST and RetinaMNIST, 5 seeds
    jomed-fast convert --format medmnist --src breastmnist_224.npz --task breast --out data/breast
    jomed-fast index-synthetic --records 100000 --out runs/ix100k    # torchrun -m jomed_fast.cli: sharded
    jomed-fast verify-index runs/ix100k --encoder runs/ix100k/encoder
    jomed-fast index-cost
    jomed-fast aot

Every subcommand takes ``--config run.yaml`` (its options as ``name: value``) and a flag per option
that overrides the file; ``jomed-fast <subcommand> --help`` lists them with their defaults. Errors
in the inputs (bad option, missing file, bad data) print one line on stderr and exit with code 2;
long steps resume when rerun with the same options. A training run stopped by SIGTERM checkpoints
first, prints one line and exits with code 143 (128 + 15); Ctrl-C exits with 130.
``--no-progress`` (or ``jomed-fast --quiet <subcommand>``, which also turns the bars off) keeps
the libraries' notices off stderr too (:mod:`.quiet`). ``jomed-fast --version`` prints the version.
"""

from __future__ import annotations

import argparse
import sys

from .._extras import MissingDependency
from ..index.distributed import RankFailed
from ..train.guards import NonFiniteLossError
from ..train.preemption import StoppedBySignal
from .options import add_options, resolve
from .quiet import quiet_libraries

__all__ = ["commands", "execute", "main", "run_commands", "run_standalone", "version"]

# Errors that are the user's to fix: one line, exit 2 (anything else is a bug and keeps its traceback;
# --debug shows the traceback of these too). OSError covers the machine's side: a full disk, a
# read-only or missing folder, a directory where a file was expected. RankFailed: another rank of a
# sharded build stopped, and printed its own error.
USER_ERRORS = (ValueError, TypeError, OSError, MissingDependency, NonFiniteLossError, RankFailed)


def commands() -> dict:
    from ..memory import cli as memory
    from . import aot, convert, demo, indexing, inference, study, training

    modules = (convert, indexing, training, inference, memory, demo, study, aot)
    return {c.name: c for module in modules for c in module.COMMANDS}


def version() -> str:
    """``jomed-fast <version>``; the installed metadata's version too when it differs (a stale
    editable install: setup.py and ``jomed_fast.__version__`` each state it)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    from .. import __version__

    text = f"jomed-fast {__version__}"
    try:
        meta = installed("jomed_fast")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return text
    return text if meta == __version__ else f"{text} (installed metadata says {meta})"


def _add_program_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--debug", action="store_true", help="show the full traceback of any error")
    ap.add_argument("--quiet", action="store_true", help="no progress bars, and no library notices (as --no-progress)")


def _parser(table: dict, prog: str, description: str) -> argparse.ArgumentParser:
    """``prog COMMAND [options]`` for each ``name: command`` of ``table``, and ``--debug``."""
    ap = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_program_flags(ap)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    for name, c in table.items():
        p = sub.add_parser(name, help=c.help, description=c.description)
        add_options(p, c.options)
    return ap


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename:  # "[Errno 28] ..." says less than this
        return f"{exc.filename}: {exc.strerror}"
    return " ".join(str(exc).split())


def _run_quietly_if_asked(command, values: dict, quiet: bool) -> int:
    """``--quiet`` turns a command's progress bars off; either makes the libraries quiet too."""
    if quiet and "progress" in values:
        values["progress"] = False
    if not (quiet or values.get("progress") is False):
        return int(command.run(values) or 0)
    with quiet_libraries():
        return int(command.run(values) or 0)


def execute(command, args: argparse.Namespace, prog: str) -> int:
    """Resolve ``command``'s options from ``args`` (defaults < --config < flags) and run it; a user
    error is one line on stderr and exit 2, a run stopped by a signal one line and 128 + the
    signal's number. Every entry point runs its command through here."""
    try:
        values = resolve(command.options, args)
        return _run_quietly_if_asked(command, values, bool(getattr(args, "quiet", False)))
    except USER_ERRORS as exc:
        if getattr(args, "debug", False):
            raise
        print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except StoppedBySignal as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def run_standalone(command, argv=None, *, prog: str) -> int:
    """One command as its own program (``python -m jomed_fast.memory``): same options, same errors."""
    ap = argparse.ArgumentParser(prog=prog, description=command.description)
    _add_program_flags(ap)
    add_options(ap, command.options)
    return execute(command, ap.parse_args(sys.argv[1:] if argv is None else list(argv)), prog)


def _run_table(ap: argparse.ArgumentParser, table: dict, argv) -> int:
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command is None:
        ap.print_help()
        return 2
    return execute(table[args.command], args, f"{ap.prog} {args.command}")


def run_commands(table: dict, argv=None, *, prog: str, description: str) -> int:
    """Several commands as one program, each under the name ``table`` gives it (``python -m
    jomed_fast.index verify`` is ``jomed-fast verify-index``): same options, same errors."""
    return _run_table(_parser(table, prog, description), table, argv)


def main(argv=None) -> int:
    table = commands()
    ap = _parser(table, "jomed-fast", __doc__)
    ap.add_argument("--version", action="version", version=version())
    return _run_table(ap, table, argv)
