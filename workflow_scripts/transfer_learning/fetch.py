"""Fetch pretrained torchvision weights and the Oxford-IIIT Pet images.

Every problem the user can act on (bad counts, an unreachable url, a full disk, a hash that
does not match) is a `FetchError`, a `UserError`: the entry points print it as one line.
Progress goes to the "transfer_learning" logger, set up by `cli.setup_logging`.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from urllib.error import URLError

import torch
import torchvision
from PIL import Image

from .errors import UserError
from .images import load_rgb
from .io import atomic_path, sha256_file
from .models import resolve_weights, url_filename

log = logging.getLogger("transfer_learning")

# torch.hub's own pattern for the sha256 prefix in checkpoint names, but
# requiring at least one hex digit so an empty match cannot pass as "checked".
HASH_PREFIX_RE = re.compile(r"-([a-f0-9]+)\.")

# Oxford-IIIT Pet binary labels: 0 = Cat, 1 = Dog (torchvision's bin_classes).
SPECIES_CLASSES = {0: "cats", 1: "dogs"}
PET_SPLITS = ("trainval", "test")
JPEG_QUALITY = 95


class FetchError(UserError):
    """A fetch failed for a reason the user can act on; the message names the url or path."""


# --------------------------------------------------------------------- weights


def hash_prefix(filename: str) -> str:
    """The sha256 prefix torchvision puts in a checkpoint name (`-<hex>.`)."""
    match = HASH_PREFIX_RE.search(filename)
    if match is None:
        raise FetchError(
            f"file name {filename!r} carries no '-<sha256 prefix>.' part; "
            "cannot verify the download"
        )
    return match.group(1)


def fetch_weights(backbone: str, name: str, dest: Path, url: str | None = None) -> Path:
    """Download the weights file to dest, verified by its sha256 name prefix."""
    weights = resolve_weights(backbone, name)
    url = url or weights.url
    # The prefix comes from the served file's name, as torch.hub does, so a
    # mirror must keep torchvision's file names.
    prefix = hash_prefix(url_filename(url))
    dest = Path(dest)
    if dest.is_file() and sha256_file(dest).startswith(prefix):
        log.info("%s already present (sha256 %s...), nothing to download", dest, prefix)
        return dest
    log.info("downloading %s -> %s", url, dest)
    try:
        with atomic_path(dest) as tmp:
            torch.hub.download_url_to_file(url, str(tmp), hash_prefix=prefix, progress=False)
    except URLError as err:
        raise FetchError(f"cannot download {url}: {err.reason}") from None
    except OSError as err:
        # The disk side: no space, no permission, a read-only file system.
        raise FetchError(f"cannot write {dest} (from {url}): {err}") from None
    except RuntimeError as err:
        # torch.hub reports a hash mismatch as a bare RuntimeError.
        raise FetchError(f"{url}: sha256 check failed for {dest.name}: {err}") from None
    return dest


# ------------------------------------------------------------------------ data


def _check_counts(counts: dict[str, dict[str, int]]) -> None:
    """Reject unknown classes, odd split names and non-count values up front."""
    if not isinstance(counts, dict) or not counts:
        raise FetchError(f"counts must be a non-empty split -> class -> number map, got {counts!r}")
    known = set(SPECIES_CLASSES.values())
    for split, per_class in counts.items():
        if not split or split in (".", "..") or "/" in split or os.sep in split:
            raise FetchError(f"counts: bad split name {split!r}")
        if not isinstance(per_class, dict):
            raise FetchError(f"counts[{split!r}] must map class -> number, got {per_class!r}")
        unknown = sorted(set(per_class) - known)
        if unknown:
            raise FetchError(
                f"counts[{split!r}]: unknown classes {unknown}; "
                f"Oxford-IIIT Pet gives only {sorted(known)}"
            )
        for cls, n in per_class.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise FetchError(f"counts[{split!r}][{cls!r}] must be a count >= 0, got {n!r}")


def _check_root_free(root: Path) -> None:
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FetchError(f"{root} already exists and is not empty; refusing to overwrite it")


def _pet_candidates(download_dir: Path, download: bool) -> dict[str, tuple[Path, str]]:
    """Pool both Oxford-IIIT Pet splits: image name -> (path, class name)."""
    pool: dict[str, tuple[Path, str]] = {}
    for split in PET_SPLITS:
        try:
            ds = torchvision.datasets.OxfordIIITPet(
                download_dir,
                split=split,
                target_types="binary-category",
                download=download,
            )
        except URLError as err:
            raise FetchError(
                f"cannot download Oxford-IIIT Pet into {download_dir}: {err.reason}"
            ) from None
        except OSError as err:
            raise FetchError(f"cannot store Oxford-IIIT Pet in {download_dir}: {err}") from None
        except RuntimeError as err:
            # Missing data (no download) or an archive failing its md5 check.
            hint = "" if download else " (downloading was turned off)"
            raise FetchError(f"Oxford-IIIT Pet in {download_dir}: {err}{hint}") from None
        # The public __getitem__ decodes (and dies on corrupt files); we need
        # the paths and species labels, which torchvision keeps here.
        for path, label in zip(ds._images, ds._bin_labels, strict=True):
            pool[Path(path).name] = (Path(path), SPECIES_CLASSES[label])
    return pool


def copy_as_is(path: Path) -> bool:
    """Decode fully (raises if corrupt); True when already an RGB JPEG, so the bytes can stay."""
    with Image.open(path) as img:
        img.load()
        return img.format == "JPEG" and img.mode == "RGB"


def _valid_images(
    names: list[str], pool: dict[str, tuple[Path, str]], skipped: list[dict]
) -> dict[str, bool]:
    """name -> copy-as-is flag for the images that decode; the rest go to skipped."""
    valid: dict[str, bool] = {}
    for name in names:
        try:
            valid[name] = copy_as_is(pool[name][0])
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            skipped.append({"file": name, "reason": f"{type(err).__name__}: {err}"})
            log.info("skipping undecodable %s: %s", name, err)
    return valid


def _select(
    counts: dict[str, dict[str, int]], valid: dict[str, dict[str, bool]], seed: int
) -> dict[str, dict[str, list[str]]]:
    """Deterministic split assignment: sorted names, seeded shuffle, splits in order."""
    short = []
    for cls, names in valid.items():
        needed = sum(per_class.get(cls, 0) for per_class in counts.values())
        if needed > len(names):
            short.append(f"class {cls!r} needs {needed} valid images, only {len(names)} available")
    if short:
        raise FetchError("not enough images: " + "; ".join(short))
    chosen: dict[str, dict[str, list[str]]] = {split: {} for split in counts}
    for cls, names in valid.items():
        # One generator per class so a class's pick does not depend on others.
        order = sorted(names)
        random.Random(seed).shuffle(order)
        start = 0
        for split, per_class in counts.items():
            n = per_class.get(cls, 0)
            chosen[split][cls] = sorted(order[start : start + n])
            start += n
    return chosen


def _write_image(src: Path, dst: Path, copy_bytes: bool) -> None:
    if copy_bytes:
        shutil.copyfile(src, dst)
        return
    load_rgb(src).save(dst, "JPEG", quality=JPEG_QUALITY)


def _build_tree(
    root: Path,
    chosen: dict[str, dict[str, list[str]]],
    pool: dict[str, tuple[Path, str]],
    valid: dict[str, dict[str, bool]],
) -> None:
    """Write the split/class tree beside root, then rename it into place."""
    partial = root.parent / f"{root.name}.partial-{os.getpid()}"
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # left over by a killed run of this pid
        for split, per_class in chosen.items():
            for cls, names in per_class.items():
                folder = partial / split / cls
                folder.mkdir(parents=True)
                for name in names:
                    _write_image(pool[name][0], folder / name, valid[cls][name])
        _check_root_free(root)
        if root.exists():
            root.rmdir()  # empty directory: rename cannot replace it on every OS
        os.replace(partial, root)
    except OSError as err:
        # The disk side: no space, no permission, a read-only file system.
        raise FetchError(f"cannot write the image tree {root}: {err}") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def fetch_oxford_pets(
    root: Path,
    counts: dict[str, dict[str, int]],
    seed: int,
    download_dir: Path,
    download: bool = True,
) -> dict:
    """Build <root>/<split>/<class>/<name>.jpg (cats/dogs) from Oxford-IIIT Pet."""
    _check_counts(counts)
    root, download_dir = Path(root), Path(download_dir)
    _check_root_free(root)
    log.info("loading Oxford-IIIT Pet from %s (download=%s)", download_dir, download)
    pool = _pet_candidates(download_dir, download)
    classes = sorted({cls for per_class in counts.values() for cls in per_class})
    skipped: list[dict] = []
    valid = {}
    for cls in classes:
        names = sorted(name for name, (_, c) in pool.items() if c == cls)
        log.info("decoding %d %s images", len(names), cls)
        valid[cls] = _valid_images(names, pool, skipped)
    chosen = _select(counts, valid, seed)
    log.info("writing %s", root)
    _build_tree(root, chosen, pool, valid)
    return {
        "root": str(root),
        "seed": seed,
        "counts": {s: {c: len(n) for c, n in pc.items()} for s, pc in chosen.items()},
        "available": {cls: len(v) for cls, v in valid.items()},
        "skipped": skipped,
    }
