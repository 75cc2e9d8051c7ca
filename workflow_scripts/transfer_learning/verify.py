"""Checks that the image data are what the config says, before any GPU hour is spent.

Every check collects problems instead of stopping at the first, so one run tells the user
everything there is to fix.

`walk_dataset` alone decides which files belong to the data set: verification checks
exactly those files and `tracking_digest`, which Snakemake uses to notice a changed data
set, fingerprints exactly those files. Both follow symbolic links (a data root, split
folder, class folder or image may be a link) and both skip hidden entries.

This module never imports PyTorch: Snakemake imports it when it loads the workflow.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import io
import itertools
import json
import logging
import multiprocessing
import os
import sys
import time
from array import array
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import UserError
from .hashing import sha256_file
from .image_files import list_folder
from .images import to_rgb

MANIFEST_COLUMNS = [
    "split",
    "class",
    "path",
    "bytes",
    "width",
    "height",
    "sha256",
    "phash",
]
DUPLICATE_MODES = ("error", "warn", "ignore")
# How many near-duplicate pairs are listed one by one; the rest are counted.
NEAR_DUPLICATES_LISTED = 50
PHASH_BITS = 64
# The perceptual hash box-averages a picture by 1, 2, 4 or 8 before anything else, the
# largest that leaves this many pixels a side: twice the 32 x 32 it transforms.
PHASH_MIN_SIDE = 64
# Images whose perceptual hashes differ in at most this many bits (and whose sizes match)
# are decoded a second time, whole, to compare their pixels exactly: a JPEG's hash comes
# from its scaled decoding, and a PNG saved from the same pixels lands 0-2 bits away.
PIXEL_CHECK_DISTANCE = 4
# Files up to this size are read once into memory, hashed and decoded from there; larger ones
# (a video left in a class folder) are hashed and decoded from disk in blocks.
READ_WHOLE_BYTES = 64 << 20
# Files per task of the worker pool (the pool's own cost per task is about a tenth of an
# image's decoding), and tasks in flight per worker: enough to keep every worker busy, few
# enough that only some hundred rows wait to be written at any time.
FILES_PER_TASK = 16
TASKS_PER_WORKER = 4
# A progress line in the log at least this often while images are being checked.
PROGRESS_SECONDS = 30.0

log = logging.getLogger("transfer_learning")


@dataclass
class Report:
    """What verification found. `manifest` holds the rows only when no manifest file was
    given to `verify_dataset` (which then streams them there); `images` counts them either
    way."""

    manifest: list[dict] = field(default_factory=list)
    counts: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    images: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


# ---- which files belong to the data set ------------------------------------------------


@dataclass
class ClassFolder:
    """The visible files of one `<split>/<class>/` folder, sorted by name.

    With `walk_dataset(..., stat=True)`, `sizes` and `mtimes_ns` hold each file's size and
    modification time (of the link target for a symbolic link; -1 where stat failed).
    """

    split: str
    label: str
    names: list[str]
    sizes: array | None = None
    mtimes_ns: array | None = None

    def paths(self) -> list[str]:
        """The files' paths relative to the data root, with '/' separators."""
        prefix = f"{self.split}/{self.label}/"
        return [prefix + name for name in self.names]


@dataclass
class DataTree:
    """What `walk_dataset` found under a data root.

    `found` is False when the root is missing or not a folder (`problems` says which).
    `classes` maps each split whose folder exists to its class folder names; `folders`
    lists every class folder in walk order; `hidden` the skipped hidden entries;
    `problems` the structural problems (missing split, split without class folders,
    unlistable folder, folder inside a class folder); `warnings` the stray files.
    """

    root: str
    found: bool = True
    classes: dict[str, list[str]] = field(default_factory=dict)
    folders: list[ClassFolder] = field(default_factory=list)
    hidden: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def files(self) -> Iterator[tuple[str, str, str]]:
        """(split, class, path relative to the root) of every file, in walk order."""
        for folder in self.folders:
            for path in folder.paths():
                yield folder.split, folder.label, path


def _scan(path: str, relative: str, tree: DataTree, stat: bool = False):
    """`list_folder` of a folder: (visible folder names, visible other entries). Hidden
    names go to `tree.hidden`; a folder that cannot be listed is a problem and gives None.
    """
    try:
        folders, others, hidden = list_folder(path, stat)
    except OSError as error:
        tree.problems.append(f"{relative}: cannot list this folder ({error.strerror})")
        return None
    tree.hidden += [relative + name for name in hidden]
    return folders, others


def walk_dataset(root: str | os.PathLike, splits: Sequence[str], stat: bool = False) -> DataTree:
    """List `<root>/<split>/<class>/<file>` in one os.scandir pass per folder.

    Symbolic links are followed wherever they are (root, split, class folder, file);
    entries whose name starts with '.' are skipped and listed in `hidden`. Files directly in
    a split folder are stray (a warning); folders inside a class folder are problems. With
    `stat`, every file is stat-ed (following links) for `tracking_digest`.
    """
    root = os.fspath(root)
    tree = DataTree(root)
    if not os.path.isdir(root):
        tree.found = False
        where = "does not exist" if not os.path.exists(root) else "is a file, not a folder"
        tree.problems.append(f"data root {root} {where} (config key data.root)")
        return tree
    for split in splits:
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            tree.problems.append(f"split folder {split}/ is missing under {root}")
            continue
        listing = _scan(split_dir, f"{split}/", tree)
        if listing is None:
            continue
        labels, strays = listing
        for name in strays:
            tree.warnings.append(f"{split}/{name}: file outside any class folder, ignored")
        if not labels:
            tree.problems.append(f"split {split}/ has no class folders")
        tree.classes[split] = labels
        for label in labels:
            listing = _scan(os.path.join(split_dir, label), f"{split}/{label}/", tree, stat)
            if listing is None:
                continue
            nested, files = listing
            for name in nested:
                tree.problems.append(
                    f"{split}/{label}/{name}/: unexpected folder inside class folder "
                    f"{split}/{label}/ (images must sit directly in it)"
                )
            tree.folders.append(_class_folder(split, label, files, stat))
    return tree


def _class_folder(split: str, label: str, files: list, stat: bool) -> ClassFolder:
    if not stat:
        return ClassFolder(split, label, files)
    names, sizes, mtimes = zip(*files, strict=True) if files else ((), (), ())
    return ClassFolder(split, label, list(names), array("q", sizes), array("q", mtimes))


def tracking_digest(root: str | os.PathLike, splits: Sequence[str]) -> str:
    """A fingerprint of the data set as verification will see it: file count, bytes, digest.

    Covers the relative path, size and modification time (following links) of every file
    `walk_dataset` yields, the class folders of every split and the structural problems,
    so adding, removing or replacing an image (also behind a link) or a folder changes it,
    while hidden files and stray files (which verification ignores) do not. Nothing is
    decoded. "missing" when the root does not exist.
    """
    if not os.path.exists(root):
        return "missing"
    tree = walk_dataset(root, splits, stat=True)
    files = sum(len(folder.names) for folder in tree.folders)
    size = sum(sum(folder.sizes) for folder in tree.folders)
    digest = hashlib.sha256()
    head = json.dumps([tree.found, tree.classes, tree.problems], ensure_ascii=True)
    digest.update(head.encode())
    for folder in tree.folders:
        lines = [f"\n{folder.split}/{folder.label}/"]
        lines += [
            f"\0{name}\0{size}\0{mtime}"
            for name, size, mtime in zip(folder.names, folder.sizes, folder.mtimes_ns, strict=True)
        ]
        digest.update("".join(lines).encode("utf-8", "surrogatepass"))
    # Readable in Snakemake's "Params have changed" reason: what changed, roughly.
    return f"{files} files, {size} bytes, digest {digest.hexdigest()[:16]}"


# ---- one image ---------------------------------------------------------------------------


def decode_image(path: str | os.PathLike) -> tuple[Image.Image, tuple[int, int]]:
    """Check and fully decode one image; raise ValueError saying why it is unusable.

    Returns the RGB image exactly as training sees it (`load_rgb`) and the width and height
    stored in the file (before any EXIF rotation). A file that cannot be read at all raises
    OSError.
    """
    if os.stat(path).st_size == 0:
        raise ValueError("zero-byte file")
    return _decode(lambda: open(path, "rb"))


def _decode(open_file, scaled: bool = False) -> tuple[Image.Image, tuple[int, int]]:
    """`decode_image` of the file `open_file()` opens (a path's file or the bytes read).

    With `scaled`, the picture comes back box-averaged by its `phash_scale` (what `phash`
    transforms), and a JPEG is decoded at that scale by libjpeg (DCT scaling, grey for a
    colour photo). That still decodes every byte of the entropy-coded data, the part a
    truncated or corrupt file breaks (tests/test_verify.py corrupts JPEGs in hundreds of
    ways: the verdict is always a full decoding's), and skips the full-size inverse DCTs and
    colour conversion, a third of the decoding of a 500 x 375 photo.
    """
    try:
        with open_file() as file, Image.open(file) as image:
            size = image.size
            # Only some formats check anything in verify() (PNG: chunk checksums); for the
            # others it is a no-op that costs a second open, so it runs only where it checks.
            checks = type(image).verify is not ImageFile.ImageFile.verify
            if not checks:
                return _load(image, scaled), size
            image.verify()
        with open_file() as file, Image.open(file) as image:
            # verify() skips the pixel data; only a full decode finds a truncated file.
            return _load(image, scaled), size
    except UnidentifiedImageError:
        raise ValueError("not an image (PIL cannot identify it)") from None
    except (FileNotFoundError, PermissionError):
        raise  # unreadable, not corrupt: the caller says so
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        text = str(error)
        kind = "truncated image" if "truncated" in text.lower() else "corrupt image"
        raise ValueError(f"{kind} ({text})") from None


def _load(image: Image.Image, scaled: bool) -> Image.Image:
    if not scaled:
        return _upright_rgb(image)
    scale = phash_scale(image.size)
    if image.format == "JPEG":
        image.draft("L", (image.width // scale, image.height // scale))
        return _upright_rgb(image)
    return _reduced(_upright_rgb(image), scale)


def _reduced(image: Image.Image, scale: int) -> Image.Image:
    return image.reduce(scale) if scale > 1 else image


def _upright_rgb(image: Image.Image) -> Image.Image:
    """`load_rgb`'s pixels of an opened image, without its two copies where they change nothing.

    `load_rgb` is `to_rgb(exif_transpose(image))`: exif_transpose copies an image that needs
    no turn, and to_rgb of an RGB image without a transparent colour key is a copy too.
    Each copy of a 500 x 375 photo costs about a sixth of its decoding; verification decodes
    every image of the data set. (tests/test_verify.py checks the pixels against load_rgb.)
    """
    ImageOps.exif_transpose(image, in_place=True)
    if image.mode == "RGB" and not isinstance(image.info.get("transparency"), int | tuple):
        return image
    return to_rgb(image)


def pixel_hash(image: Image.Image) -> str:
    """Hex sha256 of decoded pixels: mode, size and raw bytes, so re-encoding keeps it.

    Only look-alike images are hashed so (`_Images.first_with_same_pixels`): at 0.35 ms
    for a 500 x 375 photo, more than half its decoding, it would slow verification of
    every image down by half.
    """
    width, height = image.size
    digest = hashlib.sha256(f"{image.mode} {width}x{height}\n".encode())
    # Strips of about 1 MiB: as fast as one tobytes() of a small image, and for a large
    # one it avoids a second full-size copy of the pixels (twice as fast at 12 MP).
    rows = max(1, (1 << 20) // max(1, len(image.getbands()) * width))
    if rows >= height:
        digest.update(image.tobytes())
    else:
        for top in range(0, height, rows):
            digest.update(image.crop((0, top, width, min(height, top + rows))).tobytes())
    return digest.hexdigest()


# Rows 0..7 of the (unnormalised, as scipy's default) 32-point DCT-II matrix.
_DCT8x32 = np.cos(np.pi * np.outer(np.arange(8), 2 * np.arange(32) + 1) / 64)


def phash_scale(size: tuple[int, int]) -> int:
    """The box (1, 2, 4 or 8 pixels a side) `phash` averages over first: the largest that
    leaves at least PHASH_MIN_SIDE pixels a side."""
    scale = 8
    while scale > 1 and min(size) // scale < PHASH_MIN_SIDE:
        scale //= 2
    return scale


def phash(image: Image.Image) -> str:
    """64-bit DCT perceptual hash of a picture (as `load_rgb` gives it) as 16 hex digits.

    Box-averaged by `phash_scale`, greyscale, LANCZOS to 32 x 32, 2-D DCT; of the top-left
    8 x 8 coefficients each bit says whether it is above the median of the 63 non-DC ones.
    The DC term (the mean brightness, far larger than the rest) is left out of the median
    and its bit is always 0. Coefficients are rounded first so that float noise of a flat
    image cannot set bits. Averaging boxes first costs a quarter of resizing the whole
    picture, and leaving LANCZOS at least twice the final size keeps resized and
    re-encoded copies within a few bits of each other (tests/test_verify.py).
    """
    return _phash_scaled(_reduced(image, phash_scale(image.size)))


def _phash_scaled(image: Image.Image) -> str:
    """`phash` of a picture already box-averaged by its `phash_scale`."""
    grey = image.convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.float64)
    coefficients = np.round(_DCT8x32 @ pixels @ _DCT8x32.T, 6).ravel()
    bits = coefficients > np.median(coefficients[1:])
    bits[0] = False
    return np.packbits(bits).tobytes().hex()


def _examine(root: str, split: str, label: str, path: str) -> dict:
    """One manifest row; reads the file once and decodes it once (scaled: `_decode`) for
    every check and hash."""
    row = {"split": split, "class": label, "path": path}
    full = os.path.join(root, path)
    try:
        size = os.stat(full).st_size
        if size == 0:
            raise ValueError("zero-byte file")
        if size <= READ_WHOLE_BYTES:
            with open(full, "rb") as handle:
                content = handle.read()
            row["bytes"] = len(content)
            image, (row["width"], row["height"]) = _decode(lambda: io.BytesIO(content), scaled=True)
            row["sha256"] = hashlib.sha256(content).hexdigest()
        else:
            row["bytes"] = size
            image, (row["width"], row["height"]) = _decode(lambda: open(full, "rb"), True)
            row["sha256"] = sha256_file(full)
        row["phash"] = _phash_scaled(image)
    except ValueError as error:
        row["error"] = str(error)
    except OSError as error:
        dangling = os.path.islink(full) and not os.path.exists(full)
        row["error"] = "dangling symbolic link" if dangling else f"cannot read ({error})"
    return row


# ---- the whole data set ------------------------------------------------------------------


def verify_dataset(
    root: str | os.PathLike,
    splits: Sequence[str],
    expected_counts: Mapping[str, Mapping[str, int]] | None = None,
    on_count_mismatch: str = "error",
    threads: int = 1,
    duplicates: str = "error",
    near_duplicate_distance: int = 4,
    manifest: str | os.PathLike | None = None,
    progress_seconds: float = PROGRESS_SECONDS,
) -> Report:
    """Walk `<root>/<split>/<class>/` and return the manifest, counts and every problem.

    `duplicates` says what identical pixels in two splits are: a problem ("error"), a
    warning ("warn") or nothing ("ignore"); identical pixels within one split are always a
    warning. Image pairs in different splits whose perceptual hashes differ in at most
    `near_duplicate_distance` bits are warnings (0 turns this off, as does "ignore").

    With `manifest` (a path), the manifest rows are written there as the images are checked,
    in walk order, instead of being kept in `report.manifest`: memory stays bounded on a
    million images (what the data-set checks keep is under 50 bytes per image, plus the
    walk's file names). The caller decides whether to keep the file (`report.ok`). `threads`
    worker processes decode images (one CPU each); a progress line with the rate and the
    time left is logged every `progress_seconds`.
    """
    if duplicates not in DUPLICATE_MODES:
        raise UserError(f"duplicates must be one of {', '.join(DUPLICATE_MODES)}: {duplicates!r}")
    distance = near_duplicate_distance
    if isinstance(distance, bool) or not isinstance(distance, int) or not 0 <= distance <= 32:
        raise UserError(f"near_duplicate_distance must be a whole number 0..32: {distance!r}")
    report = Report()
    tree = walk_dataset(root, splits)
    report.problems += tree.problems
    report.warnings += tree.warnings
    report.skipped += tree.hidden
    if not tree.found:
        return report

    _compare_class_sets(tree.classes, report)

    images = _Images(tree)
    log.info(
        "verify_dataset: %d files in %d class folders under %s; checking them on %d CPUs",
        len(images),
        len(tree.folders),
        tree.root,
        max(1, threads),
    )
    found: dict[tuple[str, str], int] = defaultdict(int)
    progress = _Progress(len(images), progress_seconds)
    with _manifest_writer(manifest, report) as write_row:
        for index, row in enumerate(_examine_all(tree, threads)):
            if "error" in row:
                report.problems.append(f"{row['path']}: {row['error']}")
            else:
                write_row(row)
                images.add(index, row)
                found[row["split"], row["class"]] += 1
                report.images += 1
            progress.update(index + 1)
    progress.finish()

    same_pixels = images.first_with_same_pixels(threads)
    _find_leaks(report, images, same_pixels, duplicates)
    if duplicates != "ignore" and distance > 0:
        _find_near_duplicates(report, images, same_pixels, distance)
    listed = {(folder.split, folder.label) for folder in tree.folders if folder.names}
    _count(report, tree.classes, expected_counts, on_count_mismatch, listed, found)
    return report


class _Images:
    """What the data-set checks need of every file of a walk, by its index in walk order:
    whether it is a usable image, its split, its file's sha256 (the first 16 bytes), its
    phash and its size (8 bytes each). Paths are not copied: they are looked up in the
    walk's folders."""

    def __init__(self, tree: DataTree):
        self.root = tree.root
        self.folders = tree.folders
        sizes = [len(folder.names) for folder in self.folders]
        self.starts = list(itertools.accumulate(sizes, initial=0))
        split_ids = {split: i for i, split in enumerate(tree.classes)}
        n = self.starts[-1]
        self.usable = np.zeros(n, dtype=bool)
        self.content = np.zeros((n, 16), dtype=np.uint8)
        self.phashes = np.zeros(n, dtype=np.uint64)
        # Shorter side << 32 | longer side: an EXIF-turned photo and its upright copy match.
        self.shape = np.zeros(n, dtype=np.uint64)
        self.split = np.repeat(
            np.array([split_ids[f.split] for f in self.folders], dtype=np.int16), sizes
        )

    def __len__(self) -> int:
        return self.starts[-1]

    def path(self, index: int) -> str:
        k = bisect.bisect_right(self.starts, index) - 1
        folder = self.folders[k]
        return f"{folder.split}/{folder.label}/{folder.names[index - self.starts[k]]}"

    def add(self, index: int, row: Mapping) -> None:
        self.usable[index] = True
        self.content[index] = np.frombuffer(bytes.fromhex(row["sha256"])[:16], dtype=np.uint8)
        self.phashes[index] = int(row["phash"], 16)
        short, long = sorted((int(row["width"]), int(row["height"])))
        self.shape[index] = short << 32 | long

    def first_with_same_pixels(self, threads: int = 1) -> np.ndarray:
        """For each usable image, the index of the first image with the same decoded pixels
        (its own index when it is the first); -1 for unusable files.

        Identical files have identical pixels. Of the others, only look-alikes can: files
        with the same size whose perceptual hashes are within PIXEL_CHECK_DISTANCE bits
        (identical pixels give identical hashes, except that a JPEG's comes from its scaled
        decoding). Those few are decoded whole, on `threads` CPUs, and their pixels hashed.
        """
        first = _first_of_groups(self.content, self.usable)
        distinct = np.flatnonzero(first == np.arange(len(self)))
        suspects = self._look_alikes(distinct)
        if not len(suspects):
            return first
        log.info("verify_dataset: comparing the pixels of %d look-alike images", len(suspects))
        files = (self.path(int(i)) for i in suspects)
        hashes = np.zeros((len(suspects), 32), dtype=np.uint8)
        decoded = np.zeros(len(suspects), dtype=bool)
        for k, digest in enumerate(_in_workers(_pixel_hash_task, self.root, files, threads)):
            if digest is not None:  # else it changed since it was checked: no match
                hashes[k] = np.frombuffer(bytes.fromhex(digest), dtype=np.uint8)
                decoded[k] = True
        same = _first_of_groups(hashes, decoded)  # suspects are in walk order
        # The first file of each group of identical files now points to the first image
        # with its pixels; every copy follows its group's first file there.
        heads = np.arange(len(self))
        heads[suspects[decoded]] = suspects[same[decoded]]
        usable = np.flatnonzero(self.usable)
        first[usable] = heads[first[usable]]
        return first

    def _look_alikes(self, indices: np.ndarray) -> np.ndarray:
        """Those of `indices` that share their size with another of them and are within
        PIXEL_CHECK_DISTANCE bits of its phash, in walk order."""
        keys = np.stack([self.phashes[indices], self.shape[indices]], axis=1)
        unique, inverse, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
        inverse = inverse.ravel()
        chosen = counts > 1  # the same phash and size: look-alikes without a search
        for i, j, _ in near_duplicate_pairs(unique[:, 0], PIXEL_CHECK_DISTANCE):
            if unique[i, 1] == unique[j, 1]:
                chosen[i] = chosen[j] = True
        return indices[chosen[inverse]]


def _first_of_groups(digests: np.ndarray, member: np.ndarray) -> np.ndarray:
    """For each member row, the index of the first member row with the same digest (its
    own index when it is the first); -1 for the others."""
    first = np.full(len(digests), -1, dtype=np.int64)
    members = np.flatnonzero(member)
    first[members] = members
    # Sort by the digest's first 8 bytes; only rows that share them are compared whole.
    keys = np.ascontiguousarray(digests[members, :8]).view(np.uint64).ravel()
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    bounds = np.flatnonzero(ordered[1:] != ordered[:-1]) + 1
    starts, ends = np.r_[0, bounds], np.r_[bounds, len(ordered)]
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        if end - start > 1:
            heads: dict[bytes, int] = {}
            for row in members[order[start:end]].tolist():  # in walk order (stable)
                first[row] = heads.setdefault(digests[row].tobytes(), row)
    return first


def _examine_task(root: str, task: list[tuple[str, str, str]]) -> list[dict]:
    return [_examine(root, *job) for job in task]


def _pixel_hash_task(root: str, task: list[str]) -> list[str | None]:
    digests = []
    for path in task:
        try:
            digests.append(pixel_hash(decode_image(os.path.join(root, path))[0]))
        except (OSError, ValueError):
            digests.append(None)
    return digests


def _examine_all(tree: DataTree, threads: int) -> Iterator[dict]:
    """`_examine` of every file of the walk, in walk order, on `threads` CPUs."""
    return _in_workers(_examine_task, tree.root, tree.files(), threads)


def _in_workers(task_function, root: str, items: Iterable, threads: int) -> Iterator:
    """`task_function(root, task)` over `items` in tasks of FILES_PER_TASK, on `threads`
    CPUs; the results of every task, in order.

    Worker processes, not threads: decoding and hashing release the GIL, but opening a
    file, the EXIF and perceptual-hash steps are Python, and threads queueing for the
    GIL between those steps scaled worse than one process per CPU. Only a few tasks per
    worker are in flight, so the results waiting to be consumed stay few whatever the size
    of the data set (no list of every row, let alone of decoded images).
    """
    items = iter(items)
    tasks = iter(lambda: list(itertools.islice(items, FILES_PER_TASK)), [])
    if threads <= 1:
        for task in tasks:
            yield from task_function(root, task)
        return
    # fork: workers start in milliseconds with this module loaded; where fork is unsafe
    # (macOS system libraries) they start from scratch.
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    context = multiprocessing.get_context(method)
    with ProcessPoolExecutor(max_workers=threads, mp_context=context) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.submit(task_function, root, task))
            if len(pending) >= threads * TASKS_PER_WORKER:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


@contextmanager
def _manifest_writer(path: str | os.PathLike | None, report: Report):
    """A function that takes one manifest row: written to `path` as a TSV row (the format
    of `io.write_tsv`), or kept in `report.manifest` when there is no path."""
    if path is None:
        yield report.manifest.append
        return
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        yield lambda row: writer.writerow([row[column] for column in MANIFEST_COLUMNS])


class _Progress:
    """A log line every `seconds` while images are checked: how many, the rate, time left."""

    def __init__(self, total: int, seconds: float):
        self.total, self.seconds = total, seconds
        self.started = self.last = time.monotonic()
        self.done = 0

    def update(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if now - self.last < self.seconds or done >= self.total:
            return
        self.last = now
        rate = done / max(now - self.started, 1e-9)
        log.info(
            "verify_dataset: %d of %d images checked (%.0f%%), %.0f images/s, about %s left",
            done,
            self.total,
            100 * done / self.total,
            rate,
            _duration((self.total - done) / rate),
        )

    def finish(self) -> None:
        seconds = time.monotonic() - self.started
        log.info(
            "verify_dataset: %d images checked in %s, %.0f images/s",
            self.done,
            _duration(seconds),
            self.done / max(seconds, 1e-9),
        )


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _compare_class_sets(classes_of: Mapping[str, list[str]], report: Report) -> None:
    everywhere = set().union(*classes_of.values()) if classes_of else set()
    for split, classes in classes_of.items():
        missing = sorted(everywhere - set(classes))
        if classes and missing:
            report.problems.append(
                f"split {split}/ lacks class folder(s) {missing} that other splits have"
            )


def _find_leaks(report: Report, images: _Images, same_pixels: np.ndarray, duplicates: str) -> None:
    """The same picture in two splits inflates test scores; within one it only weighs double.

    "The same" means the same decoded pixels, so a photo saved again as PNG is caught too.
    `same_pixels` is `images.first_with_same_pixels()`; groups are listed in walk order.
    """
    usable = np.flatnonzero(same_pixels >= 0)
    heads = same_pixels[usable]
    _, inverse, sizes = np.unique(heads, return_inverse=True, return_counts=True)
    shared = sizes[inverse] > 1
    members, heads = usable[shared], heads[shared]
    order = np.argsort(heads, kind="stable")  # by first appearance, then walk order
    members, heads = members[order], heads[order]
    bounds = np.flatnonzero(heads[1:] != heads[:-1]) + 1
    for group in np.split(members, bounds) if len(members) else []:
        paths = ", ".join(images.path(i) for i in group.tolist())
        if len(set(images.split[group].tolist())) == 1:
            report.warnings.append(f"identical image content within one split: {paths}")
        elif duplicates == "error":
            report.problems.append(f"identical image content in more than one split: {paths}")
        elif duplicates == "warn":
            report.warnings.append(f"identical image content in more than one split: {paths}")


def near_duplicate_pairs(
    hashes: Sequence[int] | np.ndarray,
    max_distance: int,
    groups: Sequence | np.ndarray | None = None,
) -> list[tuple[int, int, int]]:
    """Every pair (i, j, distance), i < j, of 64-bit hashes within `max_distance` bits.

    With `groups`, only pairs from different groups. Multi-index hashing: the 64 bits are
    cut into max_distance + 1 chunks; two hashes that differ in at most max_distance bits
    agree on at least one whole chunk (pigeonhole), so only hashes sharing a chunk value
    are compared. Sorted by distance, then i, then j.
    """
    if isinstance(hashes, np.ndarray):
        values = hashes.astype(np.uint64)
    else:
        values = np.array([int(h) for h in hashes], dtype=np.uint64)
    n = len(values)
    labels = None if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    if n < 2 or max_distance < 0:
        return []
    chunks = min(max_distance + 1, PHASH_BITS)
    widths = [PHASH_BITS // chunks + (k < PHASH_BITS % chunks) for k in range(chunks)]
    if max_distance >= PHASH_BITS:
        widths = [0]  # every pair qualifies: one bucket
    found_i, found_j, found_d = [], [], []
    shift = 0
    for width in widths:
        mask = np.uint64((1 << width) - 1)
        keys = (values >> np.uint64(shift)) & mask
        shift += width
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], n]
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            if end - start > 1:
                _compare_bucket(
                    order[start:end], values, labels, max_distance, found_i, found_j, found_d
                )
    if not found_i:
        return []
    i = np.concatenate(found_i)
    j = np.concatenate(found_j)
    d = np.concatenate(found_d)
    low, high = np.minimum(i, j), np.maximum(i, j)
    _, first = np.unique(low.astype(np.int64) * n + high, return_index=True)
    low, high, d = low[first], high[first], d[first]
    order = np.lexsort((high, low, d))
    return list(zip(low[order].tolist(), high[order].tolist(), d[order].tolist(), strict=True))


def _compare_bucket(members, values, labels, max_distance, found_i, found_j, found_d) -> None:
    """All pairs within one bucket, in blocks of rows so a huge bucket stays small in memory."""
    size = len(members)
    block = max(1, (1 << 22) // size)
    for start in range(0, size - 1, block):
        rows = members[start : start + block]
        cols = members[start + 1 :]
        distance = np.bitwise_count(values[rows][:, None] ^ values[cols][None, :])
        # Column c (members[start + 1 + c]) comes after row r (members[start + r]) when c >= r.
        keep = np.arange(len(cols))[None, :] >= np.arange(len(rows))[:, None]
        keep &= distance <= max_distance
        if labels is not None:
            keep &= labels[rows][:, None] != labels[cols][None, :]
        r, c = np.nonzero(keep)
        if len(r):
            found_i.append(rows[r])
            found_j.append(cols[c])
            found_d.append(distance[r, c].astype(np.int64))


def _find_near_duplicates(
    report: Report, images: _Images, same_pixels: np.ndarray, max_distance: int
) -> None:
    """Pairs in different splits that look alike: re-encoded, resized or slightly cropped.

    Compared: one image per distinct pixels and split (copies with identical pixels are
    reported by _find_leaks, and a thousand copies of one placeholder must not make a
    million pairs), and only images with some structure (a flat picture hashes to 0, so
    a red and a blue square would look alike).
    """
    candidates = np.flatnonzero((same_pixels >= 0) & (images.phashes != 0))
    key = same_pixels[candidates] * (int(images.split.max(initial=0)) + 1)
    key += images.split[candidates].astype(np.int64)
    _, first = np.unique(key, return_index=True)
    chosen = candidates[np.sort(first)]
    pairs = near_duplicate_pairs(images.phashes[chosen], max_distance, images.split[chosen])
    # Identical pixels are already reported by _find_leaks.
    pairs = [p for p in pairs if same_pixels[chosen[p[0]]] != same_pixels[chosen[p[1]]]]
    for i, j, distance in pairs[:NEAR_DUPLICATES_LISTED]:
        report.warnings.append(
            f"near-duplicate images in different splits (perceptual hash distance {distance}"
            f" <= {max_distance}): {images.path(int(chosen[i]))} and "
            f"{images.path(int(chosen[j]))}"
        )
    if len(pairs) > NEAR_DUPLICATES_LISTED:
        report.warnings.append(
            f"{len(pairs) - NEAR_DUPLICATES_LISTED} more near-duplicate pair(s) in different "
            f"splits not listed ({len(pairs)} in all, distance <= {max_distance})"
        )


def _count(report, classes_of, expected_counts, on_count_mismatch, listed, found) -> None:
    """Compare the usable images per class (`found`: (split, class) -> n) with the config."""
    found = defaultdict(int, found)
    for split, classes in classes_of.items():
        for label in classes:
            if (split, label) not in listed:
                report.problems.append(f"class folder {split}/{label}/ contains no images")
    expected_counts = expected_counts or {}
    keys = {(s, c) for s, classes in classes_of.items() for c in classes}
    keys |= {(s, c) for s, per in expected_counts.items() for c in per if s in classes_of}
    for split in expected_counts:
        if split not in classes_of:
            report.problems.append(
                f"data.expected_counts names split '{split}', which is not in data.splits "
                "or has no folder"
            )
    for split, label in sorted(keys, key=lambda k: (list(classes_of).index(k[0]), k[1])):
        n = found[split, label]
        expected = expected_counts.get(split, {}).get(label) if expected_counts else None
        if expected is None:
            status = "ok" if not expected_counts else "unexpected class"
        else:
            status = "ok" if n == expected else "mismatch"
        report.counts.append(
            {"split": split, "class": label, "found": n, "expected": expected, "status": status}
        )
        if status == "unexpected class":
            report.problems.append(
                f"class folder {split}/{label}/ is not listed in data.expected_counts.{split}"
            )
        elif status == "mismatch":
            text = (
                f"{split}/{label}: found {n} usable images, expected {expected} "
                f"(data.expected_counts.{split}.{label})"
            )
            if label not in classes_of.get(split, []):
                text = (
                    f"class folder {split}/{label}/ is missing but data.expected_counts."
                    f"{split}.{label} expects {expected} images"
                )
            (report.problems if on_count_mismatch == "error" else report.warnings).append(text)


def format_problems(report: Report, root: str | os.PathLike) -> str:
    lines = [f"verify_dataset: {len(report.problems)} problem(s) in the data under {root}:"]
    lines += [f"  - {p}" for p in report.problems]
    lines.append(
        "Fix or remove these files/folders (or correct the config keys named), then re-run. "
        "Nothing downstream was started."
    )
    return "\n".join(lines)
