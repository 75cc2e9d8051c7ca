"""Images as the verified manifest lists them: loading, transforms, datasets, loaders.

Later stages never walk folders again; they read `manifest.tsv`, so they see exactly the
files that `verify_dataset` checked, in a stable order.
"""

from __future__ import annotations

import csv
import gc
import os
import signal
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T

from .distributed import batch_share
from .errors import UserError
from .images import load_rgb
from .settings import AugmentSettings


@dataclass(frozen=True, slots=True)
class Record:
    split: str
    label_name: str
    path: str  # relative to the data root
    # The file's sha256 from verification: what a resume key sees of the image.
    content: str = ""


def read_manifest(path: str | os.PathLike) -> list[Record]:
    """The manifest's rows as records, read row by row: a million rows as a list of dicts
    first would take about a gigabyte (as slotted records with shared split and class
    names: about 250 MB)."""
    with open(path, newline="", encoding="utf-8") as handle:
        return [
            Record(
                sys.intern(r["split"]),
                sys.intern(r["class"]),
                r["path"],
                r["sha256"],
            )
            for r in csv.DictReader(handle, delimiter="\t")
        ]


def class_names(records: Sequence[Record]) -> list[str]:
    """Classes sort alphabetically, so label indices match torchvision's ImageFolder."""
    return sorted({r.label_name for r in records})


def split_records(records: Sequence[Record], split: str) -> list[Record]:
    chosen = sorted((r for r in records if r.split == split), key=lambda r: r.path)
    if not chosen:
        raise UserError(f"split '{split}' has no images in the manifest")
    return chosen


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]):
    # A plain resize keeps the whole image in view, as the course did; no centre crop.
    return T.Compose(
        [
            T.Resize((image_size, image_size), antialias=True),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def train_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: AugmentSettings | None = None,
):
    """The augmentation the config asks for (`augment:`), then the plain tensor steps."""
    augment = augment or AugmentSettings()
    if augment.crop_scale is None:
        steps = [T.Resize((image_size, image_size), antialias=True)]
    else:
        steps = [T.RandomResizedCrop(image_size, scale=tuple(augment.crop_scale), antialias=True)]
    if augment.horizontal_flip:
        steps.append(T.RandomHorizontalFlip())
    if augment.vertical_flip:
        steps.append(T.RandomVerticalFlip())
    if augment.rotation:
        steps.append(T.RandomRotation(augment.rotation))
    if augment.color_jitter:
        strength = augment.color_jitter
        steps.append(T.ColorJitter(strength, strength, strength, min(0.5, strength / 2)))
    if augment.trivial_augment:
        steps.append(T.TrivialAugmentWide())
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


class PackedStrings(Sequence[str]):
    """Strings in one bytes buffer with their offsets: two objects, whatever their number."""

    def __init__(self, strings: Iterable[str]):
        # surrogatepass: any str round-trips, even a file name that was not valid UTF-8.
        encoded = [text.encode("utf-8", "surrogatepass") for text in strings]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self.offsets[1:])
        self.buffer = b"".join(encoded)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        start, end = self.offsets[index], self.offsets[index + 1]
        return self.buffer[start:end].decode("utf-8", "surrogatepass")


class ImageDataset(Dataset):
    """Manifest records as (image tensor, label) pairs.

    Each image appears `views` times. View 0 is the plain image unless `augment_all`; every
    other view is augmented. Augmentation is seeded per (seed, epoch, view, index), so it is
    the same whatever the number of loader workers and survives a resume mid-training. The
    epoch travels in the index (see `EpochSampler`): item `epoch * len(self) + i`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        records: Sequence[Record],
        classes: Sequence[str],
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        views: int = 1,
        augment_all: bool = False,
        seed: int = 0,
        augment: AugmentSettings | None = None,
    ):
        self.root = Path(root)
        index = {name: i for i, name in enumerate(classes)}
        unknown = sorted({r.label_name for r in records} - set(index))
        if unknown:
            raise UserError(f"classes {unknown} are not among the model's classes {list(classes)}")
        # Packed, not a list of records: reading them in a loader worker then touches no
        # Python object of the main process (see start_worker), so no page is copied.
        self.paths = PackedStrings(r.path for r in records)
        self.labels = np.array([index[r.label_name] for r in records], dtype=np.int64)
        self.views = views
        self.augment_all = augment_all
        self.seed = seed
        self.plain = eval_transform(image_size, mean, std)
        self.augmented = train_transform(image_size, mean, std, augment)

    def __len__(self) -> int:
        return len(self.paths) * self.views

    def __getitem__(self, item: int):
        epoch, item = divmod(item, len(self))
        view, index = divmod(item, len(self.paths))
        path = self.root / self.paths[index]
        try:
            image = load_rgb(path)
        except Exception as error:  # name the file: a bare PIL error says nothing useful
            raise UserError(f"cannot read image {path}: {error}") from error
        if view == 0 and not self.augment_all:
            tensor = self.plain(image)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(hash((self.seed, epoch, view, index)) & 0x7FFFFFFF)
                tensor = self.augmented(image)
        return tensor, int(self.labels[index])


class EpochSampler(Sampler[int]):
    """An order that depends on (seed, epoch) alone, for exact resumes.

    With `encode_epoch` the indices carry the epoch (`epoch * n + i`), so loader workers kept
    alive across epochs (persistent_workers) still augment each epoch differently; rebuilding
    workers every epoch costs seconds per epoch on a GPU node.

    With several processes (`world_size`), the one-process order is cut into global batches
    of `batch_size` and process `rank` yields its share of each (distributed.batch_share),
    `local_batch_size` at a time: together the processes train on the same batches, in the
    same order, as one process.
    """

    def __init__(
        self,
        n: int,
        shuffle: bool,
        seed: int,
        encode_epoch: bool,
        batch_size: int | None = None,
        drop_lone_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.n, self.shuffle, self.seed, self.encode_epoch = n, shuffle, seed, encode_epoch
        self.epoch = 0
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        # A last batch of ONE image cannot be normalised by BatchNorm in train mode
        # ("Expected more than 1 value per channel"): that image sits this epoch out. The
        # order is reshuffled every epoch, so it is another image each time. With several
        # processes every process needs that much of the last batch (a process with no
        # images would leave the others waiting): a smaller last batch sits out.
        self.kept = _kept_images(n, batch_size, world_size, 2 if drop_lone_last else 1)
        self.shares = self._shares()
        self.length = sum(stop - start for start, stop in self.shares)

    def _shares(self) -> list[tuple[int, int]]:
        """(start, stop) in the epoch's order of this process's part of each global batch."""
        if self.world_size == 1:
            return [(0, self.kept)]
        if not self.batch_size:
            raise ValueError("several processes share global batches: give batch_size")
        shares = []
        for start in range(0, self.kept, self.batch_size):
            size = min(self.batch_size, self.kept - start)
            part = batch_share(size, self.rank, self.world_size)
            if part.stop == part.start:
                raise UserError(
                    f"{self.kept} training images in batches of {self.batch_size} leave "
                    f"process {self.rank} of {self.world_size} without images: use fewer "
                    "GPUs (resources gpu) or a larger split"
                )
            shares.append((start + part.start, start + part.stop))
        return shares

    @property
    def local_batch_size(self) -> int | None:
        """This process's share of a full global batch: the loader's batch size."""
        if self.world_size == 1:
            return self.batch_size
        part = batch_share(self.batch_size, self.rank, self.world_size)
        return part.stop - part.start

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=generator).tolist()
        else:
            order = list(range(self.n))
        offset = self.epoch * self.n if self.encode_epoch else 0
        return iter([offset + i for start, stop in self.shares for i in order[start:stop]])

    def __len__(self) -> int:
        return self.length


def _kept_images(n: int, batch_size: int | None, world_size: int, min_share: int) -> int:
    """Images of an epoch that train: all but a last batch too small to give each of the
    `world_size` processes `min_share` images (one process: a lone last image)."""
    if not batch_size:
        return n
    last = n % batch_size
    if last and last < world_size * min_share and n > last:
        return n - last
    return n


def start_worker(_worker_id: int) -> None:
    """A loader worker's first steps, before any image.

    Slurm signals every process of the job; only the training process may act on it.
    Loader workers ignore SIGTERM/SIGUSR1, so the main process can save its state and
    shut them down itself instead of dying of a killed worker.

    A worker is a fork of the main process and shares its memory until it writes to a page.
    Python's garbage collector writes into every object it inspects, so the worker's first
    full collection would copy each page holding the main process's objects (the
    manifest's records, 80 MiB per 100,000 images, once per worker). Frozen, the objects
    the worker inherits are never inspected.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    gc.freeze()


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    workers: int = 0,
    pin_memory: bool = False,
    drop_lone_last: bool | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """A loader whose order and augmentation follow `loader.sampler.set_epoch(epoch)`.

    Training loaders (shuffled, unless `drop_lone_last` says otherwise) never end on a batch
    of one image, whatever the split and batch sizes.
    """
    sampler = EpochSampler(
        len(dataset),
        shuffle,
        seed,
        encode_epoch=isinstance(dataset, ImageDataset),
        batch_size=batch_size,
        drop_lone_last=shuffle if drop_lone_last is None else drop_lone_last,
        rank=rank,
        world_size=world_size,
    )
    sampler.set_epoch(epoch)
    return DataLoader(
        dataset,
        batch_size=sampler.local_batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        # The loader draws its workers' base seed when an iterator starts; from the global
        # generator, that draw would shift dropout after a resume (persistent workers start
        # once per run, not once per epoch). Augmentation is seeded per image anyway.
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=start_worker if workers > 0 else None,
    )


def loader_workers(threads: int, cap: int = 8) -> int:
    """Loader processes from the job's CPUs: one core stays with the main process.

    When torchrun started several processes on this node (LOCAL_WORLD_SIZE), they share the
    job's CPUs: each gets its part, and the cap applies per process.
    """
    threads //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(cap, threads - 1))
