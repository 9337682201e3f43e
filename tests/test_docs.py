"""The user's guide (README.md) and the pages in docs/ name only what exists: every repository path
and relative link, every ``jomed_fast.<module>`` (and attribute) they cite, every ``jomed-fast``
subcommand with the flags they give it and the keys of their YAML configs; no process words; and the
README stays a short guide (at most 220 lines)."""

import importlib
import re
from pathlib import Path

import pytest
import yaml

from jomed_fast.cli import commands

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 220

# a repository path: starts at one of the project's top-level folders, not inside another path
REPO_PATH = re.compile(r"(?<![\w./-])(?:\.\./)*((?:jomed_fast|bench|tests|kernels|csrc|docs|\.ci)/[\w./*-]*)")
LINK = re.compile(r"\]\(([^)\s]+)\)")
MODULE = re.compile(r"(?<![\w.])jomed_fast(?:\.[A-Za-z_]\w*)+")
SUBCOMMAND = re.compile(r"\bjomed-fast[ \t]+([a-z][a-z0-9-]*)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
YAML_BLOCK = re.compile(r"```yaml\n(.*?)```", re.S)
PROCESS_WORDS = re.compile(
    r"\bissues?\b|\bsessions?\b|\blimit 15\b|\btargets? (?:is |are )?met\b|\bfix for\b|\btask \d", re.I
)
# optional at install time (README, "The C++ packer is optional"): named, but need not be importable
OPTIONAL_MODULES = {"jomed_fast._C"}


def _text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def _ids(pages):
    return [str(p.relative_to(ROOT)) for p in pages]


def repo_paths(text: str) -> list[str]:
    return sorted({m.group(1).rstrip(".,;:") for m in REPO_PATH.finditer(text)})


def missing_paths(text: str) -> list[str]:
    return [p for p in repo_paths(text) if not (list(ROOT.glob(p)) if "*" in p else (ROOT / p).exists())]


def missing_links(page: Path, text: str) -> list[str]:
    targets = (t.split("#")[0] for t in LINK.findall(text) if not re.match(r"[a-z]+:|#", t))
    return [t for t in targets if t and not (page.parent / t).exists()]


def resolves(name: str) -> bool:
    """``jomed_fast.a.b.c``: each part an attribute of the previous or, failing that, its submodule."""
    parts = name.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=2):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        module = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # the module exists but a dependency of it is missing: not this test's
                raise
            return False
    return True


def invocations(text: str) -> list[tuple[str, str]]:
    """(subcommand, the rest of its command line) for every ``jomed-fast <subcommand>`` named: the
    line up to a closing backtick or a shell comment, continued over lines ending in a backslash."""
    lines, joined = text.splitlines(), []
    i = 0
    while i < len(lines):
        line = lines[i]
        while line.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line.rstrip()[:-1] + " " + lines[i]
        joined.append(line)
        i += 1
    found = []
    for line in joined:
        for m in SUBCOMMAND.finditer(line):
            rest = re.split(r"`| #", line[m.end() :])[0]
            found.append((m.group(1), rest))
    return found


def flags_of(command) -> set[str]:
    flags = {"--config", "--help"}
    for opt in command.options:
        flags.add(opt.flag)
        if opt.type is bool:
            flags.add("--no-" + opt.flag[2:])
    return flags


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_every_repository_path_and_link_exists(page):
    text = _text(page)
    assert missing_paths(text) == [], f"{page.name}: paths that do not exist"
    assert missing_links(page, text) == [], f"{page.name}: links that do not resolve"


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_every_module_named_resolves(page):
    names = sorted(set(MODULE.findall(_text(page))) - OPTIONAL_MODULES)
    assert names, f"{page.name} names no jomed_fast module"
    assert [n for n in names if not resolves(n)] == [], f"{page.name}: names that do not resolve"


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_every_subcommand_and_flag_named_is_real(page):
    table = commands()
    bad = []
    for sub, rest in invocations(_text(page)):
        if sub not in table:
            bad.append(f"jomed-fast {sub}")
            continue
        bad += [f"jomed-fast {sub} {flag}" for flag in FLAG.findall(rest) if flag not in flags_of(table[sub])]
    assert bad == [], f"{page.name}: subcommands or flags the CLI does not have"


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_every_yaml_config_names_options_of_its_subcommand(page):
    table = commands()
    for block in YAML_BLOCK.findall(_text(page)):
        subs = {sub for sub, _ in invocations(block)}
        assert len(subs) == 1, f"{page.name}: a YAML block must name the one subcommand it configures"
        (sub,) = subs
        names = {opt.name for opt in table[sub].options}
        keys = {key.replace("-", "_") for key in yaml.safe_load(block)}
        assert keys - names == set(), f"{page.name}: keys that jomed-fast {sub} does not take"


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_no_process_words(page):
    assert PROCESS_WORDS.findall(_text(page)) == [], page.name


def test_readme_is_a_short_guide_that_names_every_subcommand():
    text = _text(ROOT / "README.md")
    n = len(text.splitlines())
    assert n <= README_MAX_LINES, (
        f"README.md: {n} lines, expected at most {README_MAX_LINES} (measurements go in docs/)"
    )
    assert set(commands()) <= {sub for sub, _ in invocations(text)}


def test_the_checks_catch_what_does_not_exist(tmp_path):
    """The helpers above fail on made-up names (so a passing run means the pages were checked)."""
    page = tmp_path / "page.md"
    text = (
        "See `jomed_fast/no_such_module.py`, [x](no_such_page.md), `jomed_fast.ops.no_such_op`,\n"
        "`jomed-fast predict --no-such-flag`, `jomed-fast no-such-command` and docs/benchmarks.md."
    )
    assert missing_paths(text) == ["jomed_fast/no_such_module.py"]
    assert missing_links(page, text) == ["no_such_page.md"]
    assert not resolves("jomed_fast.ops.no_such_op") and resolves("jomed_fast.ops.fuse_candidates")
    assert invocations(text) == [("predict", " --no-such-flag"), ("no-such-command", "")]
    assert "--no-such-flag" not in flags_of(commands()["predict"])
    assert PROCESS_WORDS.findall("as the issue says; target met")
