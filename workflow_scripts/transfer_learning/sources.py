"""Which source files a stage program runs, and one digest of them.

Snakemake's code trigger sees only a rule's `shell:` text, not the Python it starts. Each rule
therefore carries `code_digest(<its entry point>)` as a tracked param: editing the training
loop re-runs training and what follows it; editing the plotting code re-runs only plots.
The imports are read from the text (nothing is imported), so this costs milliseconds.
"""

from __future__ import annotations

import hashlib
import re
from functools import cache
from pathlib import Path

PACKAGE = "transfer_learning"


# An import statement at the start of a line or after `;` or `:` (`if x: import y`):
# `from <dots><module> import <names>`, the names possibly in parentheses or continued with
# backslashes over several lines, or `import <modules>`.
_SPACE = r"(?:[ \t]|\\\n)"  # blanks, or a backslash that continues the line
_IMPORT = re.compile(
    rf"(?:^|[;:])[ \t]*(?:from{_SPACE}+(?P<module>\.*[\w.]*){_SPACE}*import{_SPACE}*"
    r"(?P<names>\((?:[^)#]|#[^\n]*)*\)|(?:[^\n;\\]|\\\n?)*)"  # a comment in (...) may hold ")"
    rf"|import{_SPACE}+(?P<modules>(?:[^\n;\\]|\\\n?)*))",
    re.MULTILINE,
)


def _names(text: str) -> tuple[str, ...]:
    """`a as b, c  # comment` or `(a,\n b)` -> ('a', 'c')."""
    lines = (line.partition("#")[0].rstrip("\\") for line in text.strip("()").splitlines())
    parts = " ".join(lines).split(",")
    return tuple(part.split()[0] for part in parts if part.strip())


@cache
def _imports(text: str) -> tuple[tuple[int, str | None, tuple[str, ...]], ...]:
    """(level, module, names) of every import statement in a module's text.

    Read with a regular expression, not `ast`: parsing every module for every rule costs a
    tenth of a second at each Snakemake start, the Snakemake of every Slurm job included.
    An import-like line inside a string would count too: one more tracked file, never one
    less. Cached by the text itself, so each text is read once.
    """
    found = []
    for match in _IMPORT.finditer(text):
        if match["modules"] is not None:
            found.extend((0, name, ()) for name in _names(match["modules"]))
        else:
            dotted = match["module"]
            module = dotted.lstrip(".")
            found.append((len(dotted) - len(module), module or None, _names(match["names"])))
    return tuple(found)


def _imported_modules(path: Path, package_dir: Path) -> set[Path]:
    """Package modules that the file at `path` imports directly."""
    in_package = path.parent == package_dir
    found: set[Path] = set()

    def add(name: str) -> None:
        candidate = package_dir / f"{name}.py"
        if candidate.is_file():
            found.add(candidate)

    for level, module, names in _imports(path.read_text()):
        if names:  # from ... import names
            relative = level == 1 and in_package
            if relative or module == PACKAGE:
                if module and relative:
                    add(module)
                else:
                    for name in names:
                        add(name)
            elif module and module.startswith(f"{PACKAGE}."):
                add(module.split(".")[1])
        elif module.startswith(f"{PACKAGE}."):  # import transfer_learning.x
            add(module.split(".")[1])
    return found


def stage_sources(entry_point: str | Path) -> list[Path]:
    """The entry point, the package's __init__ and every package module it reaches."""
    entry_point = Path(entry_point).resolve()
    package_dir = entry_point.parent / PACKAGE
    if not package_dir.is_dir():
        package_dir = entry_point.parent
    init = package_dir / "__init__.py"
    seen: set[Path] = {entry_point} | ({init} if init.is_file() else set())
    todo = [entry_point]
    while todo:
        for module in _imported_modules(todo.pop(), package_dir):
            if module not in seen:
                seen.add(module)
                todo.append(module)
    return sorted(seen)


@cache
def code_digest(entry_point: str | Path) -> str:
    """A short digest of the text of every source file the entry point runs."""
    digest = hashlib.sha256()
    for path in stage_sources(entry_point):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]
