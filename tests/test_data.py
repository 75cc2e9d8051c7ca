"""transfer_learning.data: augmented views and loaders that give the same batches with and
without loader workers, an order set by seed and epoch alone, no training batch of one."""

from __future__ import annotations

import gc

import pytest
import torch
from helpers import MEAN, STD
from torch.utils.data import TensorDataset
from transfer_learning import data


def _all_batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_augmentation_same_with_zero_and_two_loader_workers(small_tree):
    _, root, manifest = small_tree
    records = data.split_records(data.read_manifest(manifest), "train")[:10]
    dataset = data.ImageDataset(root, records, ["cats", "dogs"], 32, MEAN, STD, views=2, seed=4)
    serial = _all_batches(data.make_loader(dataset, 4, workers=0, seed=4, epoch=3))
    loader = data.make_loader(dataset, 4, workers=2, seed=4, epoch=3)
    parallel = _all_batches(loader)
    assert len(serial) == len(parallel) == 5
    for (xs, ys), (xp, yp) in zip(serial, parallel, strict=True):
        assert torch.equal(xs, xp) and torch.equal(ys, yp)

    images = torch.cat([x for x, _ in serial])
    plain, augmented = images[:10], images[10:]
    # View 0 is the plain resized image, view 1 an augmented copy of it.
    plain_transform = data.eval_transform(32, MEAN, STD)
    assert torch.equal(plain[0], plain_transform(data.load_rgb(root / records[0].path)))
    assert not torch.equal(plain, augmented)
    # Another epoch draws other augmentations; the plain view does not change. The same
    # loader's workers (kept alive between epochs) follow the new epoch too.
    other = torch.cat([x for x, _ in _all_batches(data.make_loader(dataset, 4, seed=4, epoch=4))])
    assert torch.equal(other[:10], plain)
    assert not torch.equal(other[10:], augmented)
    loader.sampler.set_epoch(4)
    again = torch.cat([x for x, _ in _all_batches(loader)])
    assert torch.equal(again, other)


def test_shuffled_order_depends_on_seed_and_epoch_only():
    dataset = TensorDataset(torch.arange(50))

    def order(seed, epoch):
        loader = data.make_loader(dataset, 50, shuffle=True, seed=seed, epoch=epoch)
        return next(iter(loader))[0].tolist()

    torch.manual_seed(123)
    first = order(1, 2)
    torch.manual_seed(999)  # the global generator has no say
    assert order(1, 2) == first
    assert order(1, 3) != first
    assert order(2, 2) != first


@pytest.mark.parametrize("n, batch", [(6, 5), (33, 32), (3, 2), (17, 16), (2, 2)])
def test_training_loaders_never_end_on_a_batch_of_one(n, batch):
    dataset = TensorDataset(torch.zeros(n, 1), torch.zeros(n))
    loader = data.make_loader(dataset, batch, shuffle=True, seed=1)
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        sizes = [len(y) for _, y in loader]
        assert min(sizes) > 1 or n == 1, sizes
        assert sum(sizes) >= n - 1


def test_augmentation_follows_the_config():
    from torchvision import transforms as T
    from transfer_learning.settings import AugmentSettings

    def kinds(**augment):
        steps = data.train_transform(32, MEAN, STD, AugmentSettings(**augment)).transforms
        return [type(step) for step in steps]

    default = kinds()
    assert default[:2] == [T.RandomResizedCrop, T.RandomHorizontalFlip]
    assert T.RandomRotation not in default and T.ColorJitter not in default
    assert kinds(horizontal_flip=False, crop_scale=None)[0] is T.Resize
    assert T.RandomHorizontalFlip not in kinds(horizontal_flip=False)
    everything = kinds(vertical_flip=True, rotation=15, color_jitter=0.3, trivial_augment=True)
    for kind in (T.RandomVerticalFlip, T.RandomRotation, T.ColorJitter, T.TrivialAugmentWide):
        assert kind in everything
    # A symbol that must not be mirrored stays unmirrored in every augmented view.
    image = torch.zeros(3, 32, 32)
    image[:, :, :8] = 1.0  # a bar on the left
    picture = T.ToPILImage()(image)
    no_flip = data.train_transform(
        32, [0, 0, 0], [1, 1, 1], AugmentSettings(horizontal_flip=False, crop_scale=None)
    )
    for seed in range(20):
        torch.manual_seed(seed)
        assert no_flip(picture)[:, :, :8].mean() > 0.9


def test_packed_strings_give_back_every_string():
    names = ["train/cats/a.jpg", "", "val/dogs/ü ñ 猫.png", "x/\udcff-not-utf8.jpg", "z" * 500]
    packed = data.PackedStrings(names)
    assert len(packed) == 5 and list(packed) == names
    assert packed[-1] == names[-1] and packed[1:3] == names[1:3]
    with pytest.raises(IndexError):
        packed[5]


class _WorkerGc(torch.utils.data.Dataset):
    """What a loader worker's garbage collector holds frozen."""

    def __len__(self):
        return 2

    def __getitem__(self, index):
        return torch.tensor(gc.get_freeze_count())


def test_loader_workers_leave_the_main_process_objects_alone():
    """The main process's objects, frozen in each worker: its garbage collector never
    writes into them, so their pages stay shared with the main process (no copy of the
    manifest's records per worker)."""
    assert gc.get_freeze_count() == 0  # the main process collects as usual
    batches = list(data.make_loader(_WorkerGc(), 1, workers=2))
    assert all(int(batch) > 1000 for batch in batches), batches
    assert gc.get_freeze_count() == 0
