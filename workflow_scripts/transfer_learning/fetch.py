"""Fetch pretrained torchvision weights and the Oxford-IIIT Pet images.

Stands alone: imports only the standard library, torch, torchvision and PIL.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from urllib.error import URLError
from urllib.parse import unquote, urlparse

import torch
import torchvision
from PIL import Image

# torch.hub's own pattern for the sha256 prefix in checkpoint names, but
# requiring at least one hex digit so an empty match cannot pass as "checked".
HASH_PREFIX_RE = re.compile(r"-([a-f0-9]+)\.")

# Oxford-IIIT Pet binary labels: 0 = Cat, 1 = Dog (torchvision's bin_classes).
SPECIES_CLASSES = {0: "cats", 1: "dogs"}
PET_SPLITS = ("trainval", "test")
JPEG_QUALITY = 95
CHUNK = 1 << 20

Log = Callable[[str], None]


class FetchError(RuntimeError):
    """A fetch failed for a reason the user can act on."""


def _quiet(_msg: str) -> None:
    pass


# --------------------------------------------------------------------- weights


def resolve_weights(backbone: str, name: str):
    """Return the torchvision WeightsEnum member for backbone and weights name."""
    models = torchvision.models
    try:
        enum = models.get_model_weights(backbone)
    except ValueError:
        valid = ", ".join(models.list_models(module=models))
        raise ValueError(f"unknown backbone {backbone!r}; valid backbones: {valid}") from None
    try:
        # Enum lookup by name resolves the DEFAULT alias to the real member.
        return enum[name]
    except KeyError:
        valid = ", ".join(enum.__members__)
        raise ValueError(
            f"unknown weights {name!r} for backbone {backbone!r}; valid weights: {valid}"
        ) from None


def _url_basename(url: str) -> str:
    return os.path.basename(unquote(urlparse(url).path))


def weights_filename(weights) -> str:
    """Basename of the weights' download url, e.g. mobilenet_v2-7ebf99e0.pth."""
    return _url_basename(weights.url)


def hash_prefix(filename: str) -> str:
    """The sha256 prefix torchvision puts in a checkpoint name (`-<hex>.`)."""
    match = HASH_PREFIX_RE.search(filename)
    if match is None:
        raise FetchError(
            f"file name {filename!r} carries no '-<sha256 prefix>.' part; "
            "cannot verify the download"
        )
    return match.group(1)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _temp_path(dest: Path) -> Path:
    """A fresh temporary file name in dest's folder, so the rename is atomic."""
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    return Path(name)


def fetch_weights(
    backbone: str,
    name: str,
    dest: Path,
    url: str | None = None,
    *,
    log: Log = _quiet,
) -> Path:
    """Download the weights file to dest, verified by its sha256 name prefix."""
    weights = resolve_weights(backbone, name)
    url = url or weights.url
    # The prefix comes from the served file's name, as torch.hub does, so a
    # mirror must keep torchvision's file names.
    prefix = hash_prefix(_url_basename(url))
    dest = Path(dest)
    if dest.is_file() and sha256_file(dest).startswith(prefix):
        log(f"{dest} already present (sha256 {prefix}...), nothing to download")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(dest)
    try:
        log(f"downloading {url} -> {dest}")
        torch.hub.download_url_to_file(url, str(tmp), hash_prefix=prefix, progress=False)
        os.replace(tmp, dest)
    except URLError as err:
        raise FetchError(f"cannot download {url}: {err.reason}") from None
    except RuntimeError as err:
        # torch.hub reports a hash mismatch as a bare RuntimeError.
        raise FetchError(f"{url}: sha256 check failed for {dest.name}: {err}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# ------------------------------------------------------------------------ data


def _check_counts(counts: dict[str, dict[str, int]]) -> None:
    """Reject unknown classes, odd split names and non-count values up front."""
    if not isinstance(counts, dict) or not counts:
        raise ValueError(f"counts must be a non-empty split -> class -> number map, got {counts!r}")
    known = set(SPECIES_CLASSES.values())
    for split, per_class in counts.items():
        if not split or split in (".", "..") or "/" in split or os.sep in split:
            raise ValueError(f"counts: bad split name {split!r}")
        if not isinstance(per_class, dict):
            raise TypeError(f"counts[{split!r}] must map class -> number, got {per_class!r}")
        unknown = sorted(set(per_class) - known)
        if unknown:
            raise ValueError(
                f"counts[{split!r}]: unknown classes {unknown}; "
                f"Oxford-IIIT Pet gives only {sorted(known)}"
            )
        for cls, n in per_class.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"counts[{split!r}][{cls!r}] must be a count >= 0, got {n!r}")


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
        except RuntimeError as err:
            # Missing data (no download) or an archive failing its md5 check.
            hint = "" if download else " (downloading was turned off)"
            raise FetchError(f"Oxford-IIIT Pet in {download_dir}: {err}{hint}") from None
        # The public __getitem__ decodes (and dies on corrupt files); we need
        # the paths and species labels, which torchvision keeps here.
        for path, label in zip(ds._images, ds._bin_labels, strict=True):
            pool[Path(path).name] = (Path(path), SPECIES_CLASSES[label])
    return pool


def inspect_image(path: Path) -> bool:
    """Decode fully (raises if corrupt); True when already an RGB JPEG."""
    with Image.open(path) as img:
        img.load()
        return img.format == "JPEG" and img.mode == "RGB"


def _valid_images(
    names: list[str], pool: dict[str, tuple[Path, str]], skipped: list[dict], log: Log
) -> dict[str, bool]:
    """name -> copy-as-is flag for the images that decode; the rest go to skipped."""
    valid: dict[str, bool] = {}
    for name in names:
        try:
            valid[name] = inspect_image(pool[name][0])
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            skipped.append({"file": name, "reason": f"{type(err).__name__}: {err}"})
            log(f"skipping undecodable {name}: {err}")
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


def _write_image(src: Path, dst: Path, copy_as_is: bool) -> None:
    if copy_as_is:
        shutil.copyfile(src, dst)
        return
    with Image.open(src) as img:
        img.convert("RGB").save(dst, "JPEG", quality=JPEG_QUALITY)


def _build_tree(
    root: Path,
    chosen: dict[str, dict[str, list[str]]],
    pool: dict[str, tuple[Path, str]],
    valid: dict[str, dict[str, bool]],
) -> None:
    """Write the split/class tree beside root, then rename it into place."""
    root.parent.mkdir(parents=True, exist_ok=True)
    partial = root.parent / f"{root.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)  # left over by a killed run of this pid
    try:
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
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def fetch_oxford_pets(
    root: Path,
    counts: dict[str, dict[str, int]],
    seed: int,
    download_dir: Path,
    download: bool = True,
    *,
    log: Log = _quiet,
) -> dict:
    """Build <root>/<split>/<class>/<name>.jpg (cats/dogs) from Oxford-IIIT Pet."""
    _check_counts(counts)
    root, download_dir = Path(root), Path(download_dir)
    _check_root_free(root)
    log(f"loading Oxford-IIIT Pet from {download_dir} (download={download})")
    pool = _pet_candidates(download_dir, download)
    classes = sorted({cls for per_class in counts.values() for cls in per_class})
    skipped: list[dict] = []
    valid = {}
    for cls in classes:
        names = sorted(name for name, (_, c) in pool.items() if c == cls)
        log(f"decoding {len(names)} {cls} images")
        valid[cls] = _valid_images(names, pool, skipped, log)
    chosen = _select(counts, valid, seed)
    log(f"writing {root}")
    _build_tree(root, chosen, pool, valid)
    return {
        "root": str(root),
        "seed": seed,
        "counts": {s: {c: len(n) for c, n in pc.items()} for s, pc in chosen.items()},
        "available": {cls: len(v) for cls, v in valid.items()},
        "skipped": skipped,
    }
