"""The files of a folder of unlabelled images (`predict.images`): any layout, any depth.

One walk decides which files `predict` tries, and `tracking_digest` fingerprints exactly
those files, so an added, removed or replaced image re-runs `predict`. Like the data set's
walk (`verify.walk_dataset`), it follows symbolic links (a linked folder is entered once, so
a link loop ends) and skips hidden entries (names starting with '.', e.g. `.DS_Store`).
Every other file counts: one that is not an image is reported by `predict` as unreadable.

This module never imports PyTorch: Snakemake imports it when it loads the workflow.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

HIDDEN_PREFIX = "."


@dataclass
class ImageFolder:
    """What `walk_images` found: relative paths ('/'-separated, sorted), sizes and
    modification times (of the link target; -1 where stat failed), unlistable folders."""

    root: str
    paths: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    mtimes_ns: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def walk_images(root: str | os.PathLike) -> ImageFolder:
    """Every visible file under `root`, in one os.scandir pass per folder, sorted by path."""
    root = os.fspath(root)
    found = ImageFolder(root)
    entries: list[tuple[str, int, int]] = []
    seen_folders: set[str] = set()
    pending = [("", root)]
    while pending:
        relative, folder = pending.pop()
        real = os.path.realpath(folder)
        if real in seen_folders:  # a link back to a folder already walked
            continue
        seen_folders.add(real)
        try:
            with os.scandir(folder) as listing:
                for entry in listing:
                    if entry.name.startswith(HIDDEN_PREFIX):
                        continue
                    path = relative + entry.name
                    if entry.is_dir():  # follows symbolic links
                        pending.append((path + "/", entry.path))
                        continue
                    try:
                        info = entry.stat()  # follows symbolic links
                        entries.append((path, info.st_size, info.st_mtime_ns))
                    except OSError:
                        entries.append((path, -1, -1))
        except OSError as error:
            found.problems.append(f"{relative or '.'}: cannot list this folder ({error.strerror})")
    entries.sort()
    found.paths = [path for path, _, _ in entries]
    found.sizes = [size for _, size, _ in entries]
    found.mtimes_ns = [mtime for _, _, mtime in entries]
    return found


def tracking_digest(root: str | os.PathLike) -> str:
    """A fingerprint of the folder as `predict` will see it: file count, bytes, digest of
    every file's relative path, size and modification time. Nothing is decoded."""
    if not os.path.exists(root):
        return "missing"
    found = walk_images(root)
    digest = hashlib.sha256("\n".join(found.problems).encode())
    for path, size, mtime in zip(found.paths, found.sizes, found.mtimes_ns, strict=True):
        digest.update(f"\0{path}\0{size}\0{mtime}".encode("utf-8", "surrogatepass"))
    total = sum(size for size in found.sizes if size > 0)
    # Readable in Snakemake's "Params have changed" reason: what changed, roughly.
    return f"{len(found.paths)} files, {total} bytes, digest {digest.hexdigest()[:16]}"
