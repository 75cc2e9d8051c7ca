"""Hashing of file contents: a leaf module with no PyTorch, safe to import anywhere.

Snakemake imports the verification code at workflow load, where PyTorch is not wanted, so
the file hash lives here rather than in `io` (which re-exports it).
"""

from __future__ import annotations

import hashlib
import os

BLOCK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()
