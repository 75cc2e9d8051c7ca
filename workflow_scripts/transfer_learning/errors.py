"""The package's own exceptions: a leaf module, imported by every other one.

`UserError` is the one kind of failure that `cli.run` prints as a single line: bad data, bad
settings, a missing or mismatched input. Anything else is a bug or a resource problem and
keeps its traceback.
"""

from __future__ import annotations

import signal


class UserError(ValueError):
    """Something the user can fix: the message names the file, split, class or config key.

    A ValueError, so callers that catch the standard type keep working.
    """


class InputNotFound(UserError, FileNotFoundError):
    """A file the stage needs is not there (the message says which and where it comes from)."""


class TrainingInterrupted(Exception):
    """Slurm asked the job to stop (time limit ahead, preemption); state is saved."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signal.Signals(signum).name}")
        self.signum = signum
