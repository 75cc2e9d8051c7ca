"""What every stage's command-line entry point shares: logging, exit codes, JSON options."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable

from .train import TrainingInterrupted

# Exit status of a job that Slurm stopped early and that saved its state to resume from.
EXIT_INTERRUPTED = 75


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


def run(prog: str, main: Callable[[], None]) -> None:
    """Run a stage; user errors become one line naming the culprit and a non-zero exit."""
    setup_logging()
    try:
        main()
    except TrainingInterrupted as stop:
        logging.getLogger(prog).error(
            "%s: %s; state saved, re-run (or let Slurm retry) to resume", prog, stop
        )
        raise SystemExit(EXIT_INTERRUPTED) from None
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as error:
        logging.getLogger(prog).error("%s: %s", prog, error)
        raise SystemExit(1) from None
