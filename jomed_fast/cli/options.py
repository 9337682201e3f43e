"""Options of a subcommand: one declaration feeds the flags, the YAML config and ``--help``.

Precedence: an option's default < the YAML file given with ``--config`` < a flag on the command
line. YAML keys may use dashes or underscores; an unknown key, a value of the wrong type or a
missing required option is an error naming the option (the CLI prints it on one line, exit 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

__all__ = [
    "UNSET",
    "Command",
    "Opt",
    "add_options",
    "config_from",
    "config_options",
    "option_type",
    "preset_default_doc",
    "resolve",
    "show",
]


class _Unset:
    """The default of an option made from a config field: not given, so the field keeps the value of
    the config it starts from (the dataclass's default or a preset's); None stays a value to give."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset()

# where a positional option's value lands in the argparse namespace (its flag has the option's name)
_POSITIONAL = "__positional"


@dataclasses.dataclass(frozen=True)
class Opt:
    """One option: ``name`` (snake case; the flag is ``--name-with-dashes``), its type and default.

    ``type`` is ``str``, ``int``, ``float``, ``bool`` (``--x`` / ``--no-x``) or ``list`` (strings;
    repeat the flag or give several values; ``choices`` then applies to each). ``--help`` appends
    the default to ``help`` (which should not name it): ``default_doc`` when given (a default that
    ``default`` itself does not say, such as "the index's own" for None), else ``default``.
    ``nullable``: ``none`` on the command line (``null`` in YAML) gives None (a field typed
    ``int | None``); otherwise None is refused unless it is the default. ``positional``: the value
    may also come without its flag, as the command's argument (``verify-index runs/ix``).
    """

    name: str
    type: type
    default: Any = None
    help: str = ""
    choices: tuple | None = None
    required: bool = False
    default_doc: str | None = None
    nullable: bool = False
    positional: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def metavar(self) -> str:
        name = "{" + ",".join(map(str, self.choices)) + "}" if self.choices is not None else self.type.__name__.upper()
        return name + "|none" if self.nullable else name

    def coerce(self, value: Any, where: str) -> Any:
        """``value`` (a flag's string or a YAML value) checked and typed; ``where`` says which."""
        if self.nullable and isinstance(value, str) and value.strip().lower() == "none":
            value = None
        if value is None:
            if self.nullable or self.default is None:
                return None
            raise ValueError(f"{self.flag}: expected {self._expected()} ({where}), got none")
        if self.type is list:
            return self._coerce_list(value, where)
        if self.type is bool:
            if isinstance(value, str) and value.lower() in ("true", "false"):
                value = value.lower() == "true"
            if not isinstance(value, bool):
                raise ValueError(f"{self.flag}: expected true or false ({where}), got {value!r}")
            return value
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if self.type in (int, float) and isinstance(value, str):
            try:
                value = self.type(value)
            except ValueError:
                raise ValueError(f"{self.flag}: expected {self._expected()} ({where}), got {value!r}") from None
        if not isinstance(value, self.type) or isinstance(value, bool) and self.type is not bool:
            raise ValueError(f"{self.flag}: expected {self._expected()} ({where}), got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(
                f"{self.flag}: expected one of {', '.join(map(str, self.choices))} ({where}), got {value!r}"
            )
        return value

    def _expected(self) -> str:
        return {list: "a list of strings", bool: "true or false"}.get(self.type, self.type.__name__)

    def _coerce_list(self, value: Any, where: str) -> list:
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
            raise ValueError(f"{self.flag}: expected a list of strings ({where}), got {value!r}")
        value = [str(v) for v in value]
        if self.choices is None:
            return value
        bad = [v for v in value if v not in self.choices]
        if bad:
            raise ValueError(
                f"{self.flag}: expected values among {', '.join(map(str, self.choices))} ({where}), got {bad[0]!r}"
            )
        return value


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand: its name, one-line help, longer description, options and ``run(values) -> int``."""

    name: str
    help: str
    description: str
    options: tuple
    run: Callable[[dict], int | None]


def show(value: Any) -> str:
    """A default as ``--help`` shows it: as it would be written in the YAML file (``true``, ``none``, ``paper``)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else repr(value)


def add_options(parser: argparse.ArgumentParser, options) -> None:
    """``--config`` and one flag per option (and an argument for a positional one). Each help line
    names its default once: the parser's formatter must not add its own
    (``ArgumentDefaultsHelpFormatter``), and every flag's argparse default is ``SUPPRESS`` (so that
    :func:`resolve` sees which flags were given), which also keeps ``BooleanOptionalAction`` from
    appending one."""
    parser.add_argument("--config", metavar="YAML", help="a YAML file of options (flags override it)")
    for o in options:
        shown = o.default_doc if o.default_doc is not None else show(o.default)
        doc = o.help + (" (required)" if o.required else f" (default: {shown})")
        doc = doc.replace("%", "%%")  # argparse %-formats help strings
        if o.positional:
            parser.add_argument(
                o.name + _POSITIONAL,
                nargs="?",
                default=argparse.SUPPRESS,
                metavar=o.name.upper(),
                help=f"{doc}; or give it with {o.flag}",
            )
        if o.type is bool:
            parser.add_argument(
                o.flag, dest=o.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=doc
            )
        elif o.type is list:
            parser.add_argument(
                o.flag, dest=o.name, nargs="+", action="extend", default=argparse.SUPPRESS, help=doc, metavar="VALUE"
            )
        else:
            parser.add_argument(o.flag, dest=o.name, type=str, default=argparse.SUPPRESS, help=doc, metavar=o.metavar)


class _DuplicateKey(ValueError):
    pass


def _unique_key_loader(yaml):
    """A ``SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the later one)."""

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *base": its keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                if isinstance(key, Hashable) and key in seen:
                    raise _DuplicateKey(f"key {key!r} given twice (lines {seen[key]} and {line})")
                if isinstance(key, Hashable):
                    seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def _read_yaml(path: str) -> dict:
    """The options in a YAML file, keys with dashes as underscores; two keys that name one option
    (``k_text`` and ``k-text``, or one key twice) are an error naming both, not the later one silently."""
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"--config: {p} not found")
    try:
        data = yaml.load(p.read_text(), Loader=_unique_key_loader(yaml)) or {}
    except _DuplicateKey as e:
        raise ValueError(f"--config: {p}: {e}; keep one") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--config: {p} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise TypeError(f"--config: {p} must hold a mapping of option: value, got {type(data).__name__}")
    out: dict = {}
    given: dict = {}
    for k, v in data.items():
        name = str(k).replace("-", "_")
        if name in out:
            raise ValueError(f"--config: {p} sets option {name!r} twice, as {given[name]!r} and {k!r}; keep one")
        out[name], given[name] = v, k
    return out


def resolve(options, namespace: argparse.Namespace) -> dict:
    """Defaults, then the YAML config, then the flags given; checked and typed."""
    by_name = {o.name: o for o in options}
    values = {o.name: o.default for o in options}
    config = getattr(namespace, "config", None)
    if config:
        for key, value in _read_yaml(config).items():
            if key not in by_name:
                raise ValueError(f"--config: unknown option {key!r} in {config} (known: {', '.join(sorted(by_name))})")
            values[key] = by_name[key].coerce(value, f"in {config}")
    for name, o in by_name.items():
        given = [getattr(namespace, dest) for dest in (name, name + _POSITIONAL) if hasattr(namespace, dest)]
        if len(given) > 1:
            raise ValueError(f"{o.flag}: given twice, as {given[1]!r} and with the flag as {given[0]!r}; keep one")
        if given:
            values[name] = o.coerce(given[0], "on the command line")
    for o in options:
        if o.required and values[o.name] is None:
            how = f"give {o.name.upper()} or the flag" if o.positional else "give the flag"
            raise ValueError(f"{o.flag}: required ({how} or set {o.name} in the --config file)")
    return values


_FIELD_TYPES = (int, float, str, bool)


def option_type(cls, name: str) -> tuple[type, bool]:
    """(type, nullable) of the option for the dataclass field ``cls.name``, from its annotation
    (``typing.get_type_hints``, so string annotations resolve): ``T``, ``T | None`` or ``Optional[T]``
    with T one of int, float, str, bool; anything else is a TypeError naming the field."""
    hint = typing.get_type_hints(cls)[name]
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = typing.get_args(hint) if union else (hint,)
    base = tuple(a for a in args if a is not type(None))
    if len(base) != 1 or base[0] not in _FIELD_TYPES:
        raise TypeError(
            f"{cls.__name__}.{name}: option type {hint!r} is not int/float/str/bool (or one of them | None)"
        )
    return base[0], len(base) < len(args)


def preset_default_doc(presets: dict, get: Callable[[Any], Any]) -> str:
    """``--help``'s default of a setting that presets (name -> config, the default one first) decide:
    the first preset's value, then the others' where they differ (``250; ci: 160, smoke: 12``);
    ``get(config)`` reads the setting."""
    first, *others = presets.items()
    value = get(first[1])
    differ = [f"{name}: {show(get(p))}" for name, p in others if get(p) != value]
    return show(value) + (f"; {', '.join(differ)}" if differ else "")


def _shown_default(f: dataclasses.Field, presets: dict | None) -> str:
    if presets:
        return preset_default_doc(presets, lambda config: getattr(config, f.name))
    if f.default is not dataclasses.MISSING:
        return show(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return show(f.default_factory())
    return "none"


def config_options(cls, *, skip: tuple = (), prefix: str = "", presets: dict | None = None) -> tuple:
    """One :class:`Opt` per field of a config dataclass, default :data:`UNSET` (keep the field's value).

        Option types are the fields' types (:func:`option_type`): ``int``, ``float``, ``str`` or
        ``bool``; ``T | None`` gives a nullable option (``none`` sets the field to None). ``prefix``
        namespaces the flags when two configs share a command. A field whose metadata has
        ``"setting": False`` is not an option; one with ``"choices"`` gives an option with those choices,
    one with ``"help"`` that help line (else ``Class.field``). ``presets`` (name -> instance of ``cls``, the default one
        first) makes ``--help`` show the default as :func:`preset_default_doc` does: with a preset
        option, the dataclass's own default is not what an unset flag gives.
    """
    opts = []
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("setting", True) is False:
            continue
        kind, nullable = option_type(cls, f.name)
        opts.append(
            Opt(
                prefix + f.name,
                kind,
                UNSET,
                f.metadata.get("help", f"{cls.__name__}.{f.name}"),
                choices=f.metadata.get("choices"),
                default_doc=_shown_default(f, presets),
                nullable=nullable,
            )
        )
    return tuple(opts)


def config_from(cls, values: dict, *, prefix: str = "", base=None, **fixed):
    """Build ``cls`` from ``base`` (default ``cls()``) with the options given (:data:`UNSET` or absent:
    the field keeps its value; None is a value), plus ``fixed`` fields."""
    start = base if base is not None else cls()
    changes = {
        f.name: values[prefix + f.name]
        for f in dataclasses.fields(cls)
        if values.get(prefix + f.name, UNSET) is not UNSET
    }
    changes.update(fixed)
    return dataclasses.replace(start, **changes)
