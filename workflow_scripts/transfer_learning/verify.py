"""Checks that the image data are what the config says, before any GPU hour is spent.

Every check collects problems instead of stopping at the first, so one run tells the user
everything there is to fix.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

# Finder and AppleDouble litter from copies made on a Mac; never images.
HIDDEN_PREFIXES = (".", "._")


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


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def inspect_image(path: Path) -> tuple[int, int]:
    """Decode the whole image; raise ValueError saying why it is unusable."""
    if path.stat().st_size == 0:
        raise ValueError("zero-byte file")
    try:
        with Image.open(path) as image:
            image.verify()
        # verify() skips the pixel data; only a full decode finds a truncated file.
        with Image.open(path) as image:
            image.load()
            return image.size
    except UnidentifiedImageError:
        raise ValueError("not an image (PIL cannot identify it)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        text = str(error)
        kind = "truncated image" if "truncated" in text.lower() else "corrupt image"
        raise ValueError(f"{kind} ({text})") from None


def _examine(root: Path, split: str, label: str, path: Path) -> dict:
    row = {"split": split, "class": label, "path": path.relative_to(root).as_posix()}
    try:
        row["bytes"] = path.stat().st_size
        row["width"], row["height"] = inspect_image(path)
        row["sha256"] = sha256_of(path)
    except (OSError, ValueError) as error:
        row["error"] = str(error)
    return row


def _listing(folder: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """(visible folders, visible files, hidden entries) of a folder, sorted by name."""
    folders, files, hidden = [], [], []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.startswith(HIDDEN_PREFIXES):
            hidden.append(entry)
        elif entry.is_dir():
            folders.append(entry)
        else:
            files.append(entry)
    return folders, files, hidden


def verify_dataset(
    root: str | os.PathLike,
    splits: Sequence[str],
    expected_counts: Mapping[str, Mapping[str, int]] | None = None,
    on_count_mismatch: str = "error",
    threads: int = 1,
) -> Report:
    """Walk `<root>/<split>/<class>/` and return the manifest, counts and every problem."""
    root = Path(root)
    report = Report()
    if not root.exists():
        report.problems.append(f"data root {root} does not exist (config key data.root)")
        return report
    if not root.is_dir():
        report.problems.append(f"data root {root} is a file, not a folder (config key data.root)")
        return report

    classes_of: dict[str, list[str]] = {}
    jobs: list[tuple[str, str, Path]] = []
    for split in splits:
        split_dir = root / split
        if not split_dir.is_dir():
            report.problems.append(f"split folder {split}/ is missing under {root}")
            continue
        folders, files, hidden = _listing(split_dir)
        report.skipped += [p.relative_to(root).as_posix() for p in hidden]
        for stray in files:
            report.warnings.append(
                f"{stray.relative_to(root)}: file outside any class folder, ignored"
            )
        if not folders:
            report.problems.append(f"split {split}/ has no class folders")
        classes_of[split] = [f.name for f in folders]
        for class_dir in folders:
            sub, images, hidden = _listing(class_dir)
            report.skipped += [p.relative_to(root).as_posix() for p in hidden]
            for nested in sub:
                report.problems.append(
                    f"{nested.relative_to(root)}/: unexpected folder inside class folder "
                    f"{split}/{class_dir.name}/ (images must sit directly in it)"
                )
            jobs += [(split, class_dir.name, image) for image in images]

    _compare_class_sets(classes_of, report)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        rows = list(pool.map(lambda job: _examine(root, *job), jobs))
    for row in rows:
        if "error" in row:
            report.problems.append(f"{row['path']}: {row['error']}")
        else:
            report.manifest.append(row)

    _find_leaks(report)
    _count(report, classes_of, expected_counts, on_count_mismatch, jobs)
    return report


def _compare_class_sets(classes_of: Mapping[str, list[str]], report: Report) -> None:
    everywhere = set().union(*classes_of.values()) if classes_of else set()
    for split, classes in classes_of.items():
        missing = sorted(everywhere - set(classes))
        if classes and missing:
            report.problems.append(
                f"split {split}/ lacks class folder(s) {missing} that other splits have"
            )


def _find_leaks(report: Report) -> None:
    """The same bytes in two splits inflate test scores; within one split it only weighs double."""
    by_hash: dict[str, list[dict]] = defaultdict(list)
    for row in report.manifest:
        by_hash[row["sha256"]].append(row)
    for rows in by_hash.values():
        if len(rows) < 2:
            continue
        paths = ", ".join(r["path"] for r in rows)
        if len({r["split"] for r in rows}) > 1:
            report.problems.append(f"identical image content in more than one split: {paths}")
        else:
            report.warnings.append(f"identical image content within one split: {paths}")


def _count(report, classes_of, expected_counts, on_count_mismatch, jobs) -> None:
    found: dict[tuple[str, str], int] = defaultdict(int)
    for row in report.manifest:
        found[row["split"], row["class"]] += 1
    listed = {(split, label) for split, label, _ in jobs}
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
