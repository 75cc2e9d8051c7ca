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

import hashlib
import json
import os
from array import array
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from operator import itemgetter

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import UserError
from .hashing import sha256_file
from .images import load_rgb

# Finder and AppleDouble litter from copies made on a Mac; never images. Any name starting
# with "." is hidden ("._" is listed for the reader; "." already covers it).
HIDDEN_PREFIXES = (".", "._")

MANIFEST_COLUMNS = [
    "split",
    "class",
    "path",
    "bytes",
    "width",
    "height",
    "sha256",
    "pixel_sha256",
    "phash",
]
DUPLICATE_MODES = ("error", "warn", "ignore")
# How many near-duplicate pairs are listed one by one; the rest are counted.
NEAR_DUPLICATES_LISTED = 50
PHASH_BITS = 64


@dataclass
class Report:
    manifest: list[dict] = field(default_factory=list)
    counts: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

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
    """One os.scandir pass over a folder: (visible folder names, visible other entries).

    Other entries are names, or with `stat` (name, size, mtime_ns) following links, -1 for
    a dangling link. Both lists are sorted by name. Hidden names go to `tree.hidden`; a
    folder that cannot be listed is a problem and gives None.
    """
    folders, others, hidden = [], [], []
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith(HIDDEN_PREFIXES):
                    hidden.append(relative + name)
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
    except OSError as error:
        tree.problems.append(f"{relative}: cannot list this folder ({error.strerror})")
        return None
    tree.hidden += sorted(hidden)
    folders.sort()
    others.sort(key=itemgetter(0) if stat else None)
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
    try:
        with Image.open(path) as image:
            size = image.size
            image.verify()
        # verify() skips the pixel data; only a full decode finds a truncated file.
        return load_rgb(path), size
    except UnidentifiedImageError:
        raise ValueError("not an image (PIL cannot identify it)") from None
    except (FileNotFoundError, PermissionError):
        raise  # unreadable, not corrupt: the caller says so
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        text = str(error)
        kind = "truncated image" if "truncated" in text.lower() else "corrupt image"
        raise ValueError(f"{kind} ({text})") from None


def pixel_sha256(image: Image.Image) -> str:
    """Hex sha256 of decoded pixels: mode, size and raw bytes, so re-encoding keeps it."""
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


def phash(image: Image.Image) -> str:
    """64-bit DCT perceptual hash as 16 hex digits.

    Greyscale, resized to 32 x 32, 2-D DCT; of the top-left 8 x 8 coefficients each bit
    says whether it is above the median of the 63 non-DC ones. The DC term (the mean
    brightness, far larger than the rest) is left out of the median and its bit is always
    0. Coefficients are rounded first so that float noise of a flat image cannot set bits.
    """
    grey = image.convert("L").resize((32, 32), Image.Resampling.LANCZOS, reducing_gap=3.0)
    pixels = np.asarray(grey, dtype=np.float64)
    coefficients = np.round(_DCT8x32 @ pixels @ _DCT8x32.T, 6).ravel()
    bits = coefficients > np.median(coefficients[1:])
    bits[0] = False
    return np.packbits(bits).tobytes().hex()


def _examine(root: str, split: str, label: str, path: str) -> dict:
    """One manifest row; decodes the image once for the checks and both pixel hashes."""
    row = {"split": split, "class": label, "path": path}
    full = os.path.join(root, path)
    try:
        row["bytes"] = os.stat(full).st_size
        image, (row["width"], row["height"]) = decode_image(full)
        row["sha256"] = sha256_file(full)
        row["pixel_sha256"] = pixel_sha256(image)
        row["phash"] = phash(image)
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
) -> Report:
    """Walk `<root>/<split>/<class>/` and return the manifest, counts and every problem.

    `duplicates` says what identical pixels in two splits are: a problem ("error"), a
    warning ("warn") or nothing ("ignore"); identical pixels within one split are always a
    warning. Image pairs in different splits whose perceptual hashes differ in at most
    `near_duplicate_distance` bits are warnings (0 turns this off, as does "ignore").
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

    root_dir = tree.root
    jobs = list(tree.files())
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        rows = list(pool.map(lambda job: _examine(root_dir, *job), jobs))
    for row in rows:
        if "error" in row:
            report.problems.append(f"{row['path']}: {row['error']}")
        else:
            report.manifest.append(row)

    _find_leaks(report, duplicates)
    if duplicates != "ignore" and distance > 0:
        _find_near_duplicates(report, distance)
    listed = {(folder.split, folder.label) for folder in tree.folders if folder.names}
    _count(report, tree.classes, expected_counts, on_count_mismatch, listed)
    return report


def _compare_class_sets(classes_of: Mapping[str, list[str]], report: Report) -> None:
    everywhere = set().union(*classes_of.values()) if classes_of else set()
    for split, classes in classes_of.items():
        missing = sorted(everywhere - set(classes))
        if classes and missing:
            report.problems.append(
                f"split {split}/ lacks class folder(s) {missing} that other splits have"
            )


def _find_leaks(report: Report, duplicates: str) -> None:
    """The same picture in two splits inflates test scores; within one it only weighs double.

    "The same" means the same decoded pixels, so a photo saved again as PNG is caught too.
    """
    by_hash: dict[str, list[dict]] = defaultdict(list)
    for row in report.manifest:
        by_hash[row["pixel_sha256"]].append(row)
    for rows in by_hash.values():
        if len(rows) < 2:
            continue
        paths = ", ".join(r["path"] for r in rows)
        if len({r["split"] for r in rows}) == 1:
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


def _find_near_duplicates(report: Report, max_distance: int) -> None:
    """Pairs in different splits that look alike: re-encoded, resized or slightly cropped.

    Compared: one image per distinct pixels and split (copies with identical pixels are
    reported by _find_leaks, and a thousand copies of one placeholder must not make a
    million pairs), and only images with some structure (a flat picture hashes to 0, so
    a red and a blue square would look alike).
    """
    rows, seen = [], set()
    for row in report.manifest:
        key = (row["pixel_sha256"], row["split"])
        if key not in seen and int(row["phash"], 16):
            seen.add(key)
            rows.append(row)
    pairs = near_duplicate_pairs(
        [int(row["phash"], 16) for row in rows], max_distance, [row["split"] for row in rows]
    )
    # Identical pixels are already reported by _find_leaks.
    pairs = [p for p in pairs if rows[p[0]]["pixel_sha256"] != rows[p[1]]["pixel_sha256"]]
    for i, j, distance in pairs[:NEAR_DUPLICATES_LISTED]:
        report.warnings.append(
            f"near-duplicate images in different splits (perceptual hash distance {distance}"
            f" <= {max_distance}): {rows[i]['path']} and {rows[j]['path']}"
        )
    if len(pairs) > NEAR_DUPLICATES_LISTED:
        report.warnings.append(
            f"{len(pairs) - NEAR_DUPLICATES_LISTED} more near-duplicate pair(s) in different "
            f"splits not listed ({len(pairs)} in all, distance <= {max_distance})"
        )


def _count(report, classes_of, expected_counts, on_count_mismatch, listed) -> None:
    found: dict[tuple[str, str], int] = defaultdict(int)
    for row in report.manifest:
        found[row["split"], row["class"]] += 1
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
