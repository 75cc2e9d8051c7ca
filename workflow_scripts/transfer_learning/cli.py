"""What every stage's command-line entry point shares: logging, exit codes, the settings.

A stage program takes its settings record as one `--settings` value (JSON text, or the path
of a JSON file) and, for hand runs on an interactive node, one flag per setting that
overrides the record (`finetune.py --settings run.json --lr 1e-4`); `--help` lists them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path

from .errors import TrainingInterrupted, UserError

# Exit status of a job that Slurm stopped early and that saved its state to resume from.
EXIT_INTERRUPTED = 75
# Under torchrun (launch.py), the folder where a process that stops so leaves a mark:
# torchrun itself exits 1 when a process fails, and launch.py turns that into 75.
INTERRUPTED_MARKS = "TRANSFER_LEARNING_INTERRUPTED_MARKS"


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        stream=sys.stderr,
    )


def json_arg(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON: {error}") from None


def optional(text: str) -> str | None:
    """'none'/'null'/'' on the command line stand for no value."""
    return None if text.lower() in ("", "none", "null") else text


def threads_default() -> int:
    return int(os.environ.get("SLURM_CPUS_PER_TASK", os.cpu_count() or 1))


def add_images(parser: argparse.ArgumentParser) -> None:
    """Where a stage's images are: the verified manifest and the data root it is relative to."""
    parser.add_argument("--manifest", required=True, help="manifest.tsv of verify_dataset")
    parser.add_argument("--data-root", required=True)


def add_runtime(parser: argparse.ArgumentParser) -> None:
    """How a stage runs (never what it computes): CPUs for loader workers, the device."""
    group = parser.add_argument_group("runtime (speed only, never the results)")
    group.add_argument("--threads", type=int, default=threads_default())
    group.add_argument("--max-workers", type=int, default=8, help="cap on loader processes")
    group.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda:0")


def _flag_type(hint):
    """argparse type and nargs of one settings field."""
    args = typing.get_args(hint)
    nullable = type(None) in args
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is tuple:
        return typing.get_args(hint)[0], "+"
    if hint is dict or dataclasses.is_dataclass(hint):
        return json_arg, None
    if nullable:
        return (lambda text: None if optional(text) is None else hint(text)), None
    return hint, None


def add_settings(parser: argparse.ArgumentParser, record: type) -> None:
    """`--settings` plus one overriding flag per field of the settings record."""
    group = parser.add_argument_group(
        f"{record.SECTION} settings",
        "the record as --settings JSON (or a JSON file); each flag below overrides one field",
    )
    group.add_argument(
        "--settings",
        default="{}",
        help="JSON object, or the path of a file holding one (what the workflow passes)",
    )
    hints = typing.get_type_hints(record)
    for field in dataclasses.fields(record):
        flag = "--" + field.name.replace("_", "-")
        hint = hints[field.name]
        if hint is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
            continue
        kind, nargs = _flag_type(hint)
        group.add_argument(flag, type=kind, nargs=nargs, default=None, metavar=field.name.upper())


def settings_from_args(args: argparse.Namespace, record: type):
    """The record from `--settings`, with every flag given on the command line applied."""
    text = args.settings
    if not text.lstrip().startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise UserError(f"--settings: {text} is neither a JSON object nor a file")
        text = path.read_text()
    values = json.loads(text) if text.strip() else {}
    if not isinstance(values, dict):
        raise UserError("--settings must hold a JSON object")
    for field in dataclasses.fields(record):
        given = getattr(args, field.name, None)
        if given is not None:
            values[field.name] = given
    return record.from_mapping(values, f"{record.SECTION} settings")


def run(prog: str, main: Callable[[], None], *, memory_hint: str = "") -> None:
    """Run a stage; user errors become one line naming the culprit and a non-zero exit.

    Anything that is not a `UserError` is a bug or a resource problem: it keeps its full
    traceback. A CUDA out-of-memory also says which setting to lower (`memory_hint`).
    """
    setup_logging()
    logger = logging.getLogger(prog)
    try:
        main()
    except TrainingInterrupted as stop:
        logger.error("%s: %s; state saved, re-run (or let Slurm retry) to resume", prog, stop)
        marks = os.environ.get(INTERRUPTED_MARKS)
        if marks:
            Path(marks, f"rank{os.environ.get('RANK', '0')}").touch()
        raise SystemExit(EXIT_INTERRUPTED) from None
    except UserError as error:
        logger.error("%s: %s", prog, error)
        raise SystemExit(1) from None
    except Exception as error:
        # Named, not imported: importing torch here would slow every program's start.
        if type(error).__name__ == "OutOfMemoryError" and memory_hint:
            logger.exception(
                "%s: the GPU ran out of memory; lower %s (or ask for a GPU with more memory)",
                prog,
                memory_hint,
            )
            raise SystemExit(1) from None
        raise
