"""Which source files a stage program runs, and one digest of them.

Snakemake's code trigger sees only a rule's `shell:` text, not the Python it starts. Each rule
therefore carries `code_digest(<its entry point>)` as a tracked param: editing the training
loop re-runs training and what follows it; editing the plotting code re-runs only plots.
The imports are read with `ast` (nothing is imported), so this costs milliseconds.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

PACKAGE = "transfer_learning"


def _imported_modules(path: Path, package_dir: Path) -> set[Path]:
    """Package modules that the file at `path` imports directly."""
    in_package = path.parent == package_dir
    found: set[Path] = set()

    def add(name: str) -> None:
        candidate = package_dir / f"{name}.py"
        if candidate.is_file():
            found.add(candidate)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            relative = node.level == 1 and in_package
            if relative or node.module == PACKAGE:
                if node.module and relative:
                    add(node.module)
                else:
                    for alias in node.names:
                        add(alias.name)
            elif node.module and node.module.startswith(f"{PACKAGE}."):
                add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(f"{PACKAGE}."):
                    add(alias.name.split(".")[1])
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
