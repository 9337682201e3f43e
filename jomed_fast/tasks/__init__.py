"""Tasks: what the reader is asked and how its answer is read (``jomed_fast.tasks``).

>>> from jomed_fast.tasks import get_task
>>> t = get_task("breast")
>>> t.prompt()
'Does this breast ultrasound image show signs of cancer?'
>>> t.parse(" yes. "), t.format_answer(0)
(1, 'No')
>>> get_task("vindr_pcxr").parse("0, 3,14") == frozenset({0, 3, 14})
True

Registered tasks (see :mod:`jomed_fast.tasks.catalog` for where each prompt comes from):
``breast``, ``derma``, ``retina``, ``vindr_pcxr``, ``brset``, ``vqa_rad_closed``, ``vqa_rad_open``,
``slake_closed``, ``slake_open``, ``pathvqa_closed``, ``pathvqa_open``, ``synthetic``, with the
paper's prompts; each but ``synthetic`` also as ``<name>_reference``, the authors' code's prompts
(``get_task(name, prompts="reference")``). Names are case-insensitive, ``-`` and spaces read as
``_``, and a few aliases resolve (``"VinDr-PCXR"``, ``"SLAKE"`` -> ``slake_closed``, ``"breastmnist"``).
"""

from __future__ import annotations

from typing import Iterator

from .catalog import ALIASES, PROMPT_STYLES, builtin_tasks, legend_instructions, paper_legend
from .spec import KINDS, Task, normalize, normalize_open_answer
from .task_file import load_task_file

# The verbalizer (tokenizer-dependent) loads on first use: the data loaders and configs that
# only need a Task never import it.
_LAZY = {"RestrictedDecoding", "Verbalizer", "build_verbalizer"}

__all__ = [
    "KINDS",
    "Task",
    "Verbalizer",
    "RestrictedDecoding",
    "build_verbalizer",
    "get_task",
    "load_task_file",
    "register_task",
    "task_names",
    "iter_tasks",
    "normalize",
    "normalize_open_answer",
    "legend_instructions",
    "paper_legend",
    "PROMPT_STYLES",
]

_REGISTRY: dict[str, Task] = {t.name: t for style in PROMPT_STYLES for t in builtin_tasks(style)}


def __getattr__(name: str):
    if name in _LAZY:
        from . import verbalizer

        value = getattr(verbalizer, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _LAZY)


def _key(name: str) -> str:
    return "_".join(name.strip().lower().replace("-", " ").replace("_", " ").split())


def task_names() -> list[str]:
    """Registered task names, sorted."""
    return sorted(_REGISTRY)


def iter_tasks() -> Iterator[Task]:
    for n in task_names():
        yield _REGISTRY[n]


def get_task(name: str, prompts: str = "paper") -> Task:
    """The registered task ``name`` (case-insensitive; ``-``/space = ``_``; aliases resolve).

    ``prompts``: ``"paper"`` (the listings' prompts) or ``"reference"`` (the authors' code's: the
    ``<name>_reference`` variant; a task with one variant only, such as ``synthetic`` or one added
    with :func:`register_task`, is returned as it is). Raises ``ValueError`` listing the known
    names when there is no such task.
    """
    if prompts not in PROMPT_STYLES:
        raise ValueError(f"prompts: expected one of {PROMPT_STYLES}, got {prompts!r}")
    if isinstance(name, Task):
        return name
    if not isinstance(name, str):
        raise TypeError(f"get_task: expected the task name as str, got {type(name).__name__}")
    key = _key(name)
    key = ALIASES.get(key, key)
    if prompts == "reference" and f"{key}_reference" in _REGISTRY:
        key = f"{key}_reference"
    try:
        return _REGISTRY[key]
    except KeyError:
        raise ValueError(
            f"unknown task {name!r}: known tasks are {', '.join(task_names())} (aliases: {', '.join(sorted(ALIASES))})"
        ) from None


def register_task(task: Task, *, overwrite: bool = False) -> Task:
    """Add ``task`` to the registry under ``task.name``; refuses to replace one unless ``overwrite``."""
    if not isinstance(task, Task):
        raise TypeError(f"register_task: expected a Task, got {type(task).__name__}")
    key = _key(task.name)
    if key != task.name:
        raise ValueError(f"register_task: task name {task.name!r} must be lower-case snake_case ({key!r})")
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"register_task: a task named {key!r} is already registered; pass overwrite=True")
    if key in ALIASES:
        raise ValueError(f"register_task: {key!r} is an alias of {ALIASES[key]!r}")
    _REGISTRY[key] = task
    return task
