#!/usr/bin/env python3
"""Check config overlays before Snakemake reads them: YAML errors with file and line, then
every schema problem of the merged configuration, one line each.

Snakemake parses `--configfile` files before the workflow's own code runs, and its message
for a YAML mistake ("Config file is not valid JSON or YAML") names neither file nor line.

Usage: python workflow_scripts/check_config.py my.yaml [more.yaml ...]
"""

import argparse
import logging
from pathlib import Path

import yaml
from transfer_learning import cli, settings
from transfer_learning.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
log = logging.getLogger("check_config")


def load_yaml(path: Path) -> dict:
    """The overlay as a dict; a YAML mistake names the file, line and column."""
    try:
        with open(path, encoding="utf-8") as handle:
            loaded = yaml.safe_load(handle)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else f"{path}"
        problem = getattr(error, "problem", None) or str(error)
        context = getattr(error, "context", None)
        raise UserError(f"{where}: {problem}" + (f" ({context})" if context else "")) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: a config file holds keys at the top level, not a list or text")
    return loaded


def check(paths: list[Path]) -> list[str]:
    """Problems of the default config with these overlays merged over it, in order."""
    merged = load_yaml(CONFIG_DIR / "config.yaml")
    for path in paths:
        overlay = load_yaml(path)
        merged = settings.deep_merge(merged, overlay)
        if "expected_counts" in (overlay.get("data") or {}):
            merged["data"]["expected_counts"] = overlay["data"]["expected_counts"]
    schema = load_yaml(CONFIG_DIR / "schema.yaml")
    settings.numbers_from_text(merged, schema)
    return settings.schema_errors(merged, schema)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configfiles", nargs="+", type=Path)
    args = parser.parse_args()
    problems = check(args.configfiles)
    if problems:
        raise UserError("invalid configuration:\n  " + "\n  ".join(problems))
    log.info("%s: no problems found", ", ".join(map(str, args.configfiles)))


if __name__ == "__main__":
    cli.run("check_config", main)
