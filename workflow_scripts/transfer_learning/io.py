"""Atomic writes of checkpoints and tables, and their loading.

A job killed by Slurm (time limit, preemption, node failure) must never leave a half-written
file that a later stage could read, so everything is written to a temporary name in the
target's folder and renamed over the target, which POSIX makes atomic on one file system.
"""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import InputNotFound
from .hashing import sha256_file  # noqa: F401  (one hash helper; io re-exports it)


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to `path`; rename it onto `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    # mkstemp makes the file private; results are meant for the group, as the umask says.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(obj: Mapping, path: str | os.PathLike) -> None:
    import torch  # here, not at the top: the workflow imports this module while parsing

    with atomic_path(path) as tmp:
        torch.save(dict(obj), tmp)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint of tensors and plain data; never unpickles arbitrary objects."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"checkpoint not found: {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def write_tsv(
    path: str | os.PathLike, rows: Iterable[Mapping], columns: Sequence[str] | None = None
) -> None:
    """Write dict rows as a tab-separated table with a header, atomically."""
    rows = list(rows)
    if columns is None:
        columns = list(rows[0]) if rows else []
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
            writer.writerow(columns)
            for row in rows:
                writer.writerow([_cell(row.get(c)) for c in columns])


def read_tsv(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))
