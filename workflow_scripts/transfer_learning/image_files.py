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
from operator import itemgetter

# Finder and AppleDouble litter (`.DS_Store`, `._photo.jpg`) from copies made on a Mac,
# and every other name starting with "." : never images.
HIDDEN_PREFIX = "."


def list_folder(path: str, stat: bool = False) -> tuple[list[str], list, list[str]]:
    """One os.scandir pass over a folder: (visible folder names, visible other entries,
    hidden names), each sorted by name.

    Folders and files behind symbolic links count as what they point to. Other entries are
    names or, with `stat`, (name, size, mtime_ns) of the link target, (name, -1, -1) where
    stat fails (a dangling link). Raises OSError when the folder cannot be listed.
    """
    folders, others, hidden = [], [], []
    with os.scandir(path) as entries:
        for entry in entries:
            name = entry.name
            if name.startswith(HIDDEN_PREFIX):
                hidden.append(name)
            elif entry.is_dir():  # follows symbolic links
                folders.append(name)
            elif not stat:
                others.append(name)
            else:
                try:
                    info = entry.stat()  # follows symbolic links
                    others.append((name, info.st_size, info.st_mtime_ns))
                except OSError:
                    others.append((name, -1, -1))
    folders.sort()
    others.sort(key=itemgetter(0) if stat else None)
    hidden.sort()
    return folders, others, hidden


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
    """Every visible file under `root` (`list_folder` of each folder), sorted by path."""
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
            folders, files, _ = list_folder(folder, stat=True)
        except OSError as error:
            found.problems.append(f"{relative or '.'}: cannot list this folder ({error.strerror})")
            continue
        pending += [(f"{relative}{name}/", os.path.join(folder, name)) for name in folders]
        entries += [(relative + name, size, mtime) for name, size, mtime in files]
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
