"""The package without Snakemake: models, data loading, metrics, the training loop with
its resume file, the stage functions, atomic writes. Real torchvision models with random
weights (or a local state dict), real images."""

from __future__ import annotations

import itertools
import math
import shutil
import signal

import numpy as np
import pytest
import torch
import torchvision
from conftest import write_images
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset
from transfer_learning import checkpoint, data, io, metrics, models, stages, train, verify
from transfer_learning.settings import (
    EvaluateSettings,
    FeatureSettings,
    FinetuneSettings,
    HeadSettings,
)
from transfer_learning.verify import MANIFEST_COLUMNS

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

# ---- models ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backbone, dim",
    [("mobilenet_v2", 1280), ("resnet18", 512), ("resnet50", 2048), ("efficientnet_b0", 1280)],
)
def test_build_backbone_gives_pooled_features(backbone, dim):
    torch.manual_seed(0)
    model = models.build_backbone(backbone, None)
    assert models.feature_dim(model, 32) == dim
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert tuple(out.shape) == (2, dim)
    # No Linear layer is left: the classifier is gone.
    assert not any(isinstance(m, nn.Linear) for m in model.modules())


def test_unknown_backbone_names_the_key():
    with pytest.raises(ValueError, match=r"mobilenet_v9.*model\.backbone"):
        models.build_backbone("mobilenet_v9")


def test_mobilenet_v2_blocks_and_course_trainable_parameters():
    model = models.build_backbone("mobilenet_v2")
    blocks = models.backbone_blocks(model)
    assert len(blocks) == 19
    assert all(a is b for a, b in zip(blocks, model.features, strict=True))
    assert models.default_unfreeze_blocks(len(blocks)) == 5

    classifier = models.Classifier(model, models.Head(1280, 2))
    frozen = models.set_trainable(classifier, None)
    assert frozen == blocks[:14]
    trainable, fixed = models.count_parameters(classifier)
    # The course: features[14..18] and the head train, about 1.68 M parameters.
    assert 1.6e6 <= trainable <= 1.8e6, trainable
    expected = sum(p.numel() for b in model.features[14:] for p in b.parameters()) + 1280 + 1
    assert trainable == expected
    assert trainable + fixed == sum(p.numel() for p in classifier.parameters())
    for i, block in enumerate(model.features):
        assert all(p.requires_grad == (i >= 14) for p in block.parameters())

    # Frozen blocks stay in eval mode while training (their BatchNorm statistics too).
    models.train_mode(classifier, frozen)
    assert all(not m.training for b in frozen for m in b.modules())
    assert all(m.training for m in model.features[14].modules())

    # An explicit count, and zero: only the head trains.
    models.set_trainable(classifier, 2)
    assert models.count_parameters(classifier)[0] == (
        sum(p.numel() for b in model.features[17:] for p in b.parameters()) + 1281
    )
    models.set_trainable(classifier, 0)
    assert models.count_parameters(classifier)[0] == 1281


def test_local_state_dict_loads_and_ignores_another_classifier(tmp_path):
    torch.manual_seed(1)
    source = torchvision.models.mobilenet_v2(num_classes=10)  # a 10-class classifier
    path = tmp_path / "mine.pth"
    torch.save(source.state_dict(), path)
    model = models.build_backbone("mobilenet_v2", path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key
    # Wrapped the way training scripts often save it.
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, wrapped)
    again = models.build_backbone("mobilenet_v2", wrapped)
    assert torch.equal(again.features[0][0].weight, source.features[0][0].weight)


def test_state_dict_of_another_architecture_names_keys(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ValueError) as error:
        models.build_backbone("mobilenet_v2", path)
    text = str(error.value)
    assert "do not fit backbone MobileNetV2" in text
    assert "missing keys: features." in text
    assert "unexpected keys: bn1.bias" in text and "bn1.weight" in text

    narrow = tmp_path / "narrow.pth"
    torch.save(torchvision.models.mobilenet_v2(width_mult=0.5).state_dict(), narrow)
    with pytest.raises(ValueError, match="keys of another shape: features.0.0.weight"):
        models.build_backbone("mobilenet_v2", narrow)
    with pytest.raises(FileNotFoundError, match="model.weights"):
        models.build_backbone("mobilenet_v2", tmp_path / "absent.pth")


def test_head_standardises_with_training_statistics():
    torch.manual_seed(0)
    # Random-init features are tiny; one column is constant.
    features = torch.randn(200, 3, dtype=torch.float64).float() * 1e-10 + 5e-10
    features[:, 2] = 7.0
    head = models.Head(3, 3, dropout=0.5)
    head.fit_standardisation(features)
    with torch.no_grad():
        head.linear.weight.copy_(torch.eye(3))
        head.linear.bias.zero_()
    head.eval()
    with torch.no_grad():
        out = head(features)
    assert torch.isfinite(out).all()
    assert out[:, :2].mean(0).abs().max() < 1e-3
    assert (out[:, :2].std(0) - 1).abs().max() < 1e-3
    assert torch.equal(out[:, 2], torch.zeros(200))  # constant column: std 1, not 0
    assert head.std[2] == 1.0
    # The statistics are buffers: they travel with the state dict.
    assert {"mean", "std"} <= set(head.state_dict())


def test_binary_and_multiclass_heads_losses_and_probabilities():
    torch.manual_seed(0)
    binary, three = models.Head(4, 2), models.Head(4, 3)
    assert binary.linear.out_features == 1 and three.linear.out_features == 3
    assert isinstance(models.loss_function(2), nn.BCEWithLogitsLoss)
    assert isinstance(models.loss_function(3), nn.CrossEntropyLoss)

    logits = torch.tensor([[2.0], [-1.0], [0.0]])
    labels = torch.tensor([1, 0, 0])
    probs = models.probabilities(logits, 2)
    assert probs.shape == (3, 2)
    assert torch.allclose(probs[:, 1], torch.sigmoid(logits[:, 0]))
    assert torch.allclose(probs.sum(1), torch.ones(3))
    assert train.correct_predictions(logits, labels, 2) == 3  # 0.0 is class 0
    # The training loss is the log loss of the probabilities the evaluation reports.
    loss = models.loss_function(2)(
        models.logits_for_loss(logits, 2), models.loss_targets(labels, 2)
    )
    assert float(loss) == pytest.approx(metrics.log_loss(labels.numpy(), probs.numpy()), rel=1e-6)

    logits3 = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 5.0], [4.0, -1.0, 0.0]])
    labels3 = torch.tensor([2, 1, 0])
    probs3 = models.probabilities(logits3, 3)
    assert torch.allclose(probs3, torch.softmax(logits3, 1))
    assert train.correct_predictions(logits3, labels3, 3) == 2
    loss3 = models.loss_function(3)(
        models.logits_for_loss(logits3, 3), models.loss_targets(labels3, 3)
    )
    assert float(loss3) == pytest.approx(
        metrics.log_loss(labels3.numpy(), probs3.numpy()), rel=1e-6
    )


# ---- metrics -----------------------------------------------------------------------------


def test_classification_metrics_three_classes_by_hand():
    true = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array(
        [
            [0.7, 0.2, 0.1],  # 0 -> 0
            [0.3, 0.6, 0.1],  # 0 -> 1
            [0.1, 0.8, 0.1],  # 1 -> 1
            [0.2, 0.5, 0.3],  # 1 -> 1
            [0.1, 0.1, 0.8],  # 2 -> 2
            [0.5, 0.1, 0.4],  # 2 -> 0
        ]
    )
    row = metrics.classification_metrics(true, probs, ["a", "b", "c"])
    assert row["n"] == 6
    assert row["accuracy"] == pytest.approx(4 / 6)
    assert row["loss"] == pytest.approx(-np.mean(np.log([0.7, 0.3, 0.8, 0.5, 0.8, 0.4])))
    assert (row["precision_a"], row["recall_a"], row["f1_a"]) == pytest.approx((0.5, 0.5, 0.5))
    assert (row["precision_b"], row["recall_b"], row["f1_b"]) == pytest.approx((2 / 3, 1.0, 0.8))
    assert (row["precision_c"], row["recall_c"], row["f1_c"]) == pytest.approx((1.0, 0.5, 2 / 3))
    assert row["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert row["roc_auc"] == pytest.approx(11 / 12)  # macro one-vs-rest, by pair counts
    assert metrics.confusion_matrix(true, probs.argmax(1), 3).tolist() == [
        [1, 1, 0],
        [0, 2, 0],
        [1, 0, 1],
    ]


def test_class_never_predicted_has_zero_precision_not_nan():
    row = metrics.classification_metrics(
        np.array([0, 1]), np.array([[0.9, 0.1], [0.8, 0.2]]), ["x", "y"]
    )
    assert row["precision_y"] == 0.0 and row["recall_y"] == 0.0 and row["f1_y"] == 0.0
    assert row["precision_x"] == 0.5 and row["recall_x"] == 1.0


def _auc_by_pairs(true, score):
    pos, neg = score[true == 1], score[true == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_matches_pair_count(seed):
    rng = np.random.default_rng(seed)
    true = rng.integers(0, 2, 60)
    true[:2] = [0, 1]
    score = np.round(rng.random(60) * 0.5 + true * 0.3, 1)  # many ties
    assert metrics.roc_auc(true, score) == pytest.approx(_auc_by_pairs(true, score), abs=1e-12)
    probs = np.stack([1 - score, score], 1)
    row = metrics.classification_metrics(true, probs, ["neg", "pos"])
    assert row["roc_auc"] == pytest.approx(_auc_by_pairs(true, score), abs=1e-12)


def test_roc_auc_edge_cases_and_curve():
    assert metrics.roc_auc(np.array([1, 0]), np.array([0.9, 0.1])) == 1.0
    assert metrics.roc_auc(np.array([1, 0]), np.array([0.1, 0.9])) == 0.0
    assert metrics.roc_auc(np.array([1, 0]), np.array([0.5, 0.5])) == 0.5
    assert math.isnan(metrics.roc_auc(np.array([1, 1]), np.array([0.3, 0.4])))
    fpr, tpr = metrics.roc_curve(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.75)


# ---- images ------------------------------------------------------------------------------


def test_load_rgb_makes_every_kind_upright_rgb(tmp_path):
    Image.new("L", (10, 10), 100).save(tmp_path / "grey.png")
    grey = data.load_rgb(tmp_path / "grey.png")
    assert grey.mode == "RGB" and grey.getpixel((3, 3)) == (100, 100, 100)

    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 255))
    rgba.paste((0, 255, 0, 0), (0, 0, 5, 10))  # left half fully transparent green
    rgba.save(tmp_path / "alpha.png")
    loaded = data.load_rgb(tmp_path / "alpha.png")
    assert loaded.mode == "RGB"
    assert loaded.getpixel((1, 1)) == (255, 255, 255)
    assert loaded.getpixel((8, 1)) == (255, 0, 0)

    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.info["transparency"] = 0
    palette.paste(0, (0, 0, 4, 8))
    palette.save(tmp_path / "palette.png")
    loaded = data.load_rgb(tmp_path / "palette.png")
    assert loaded.getpixel((1, 1)) == (255, 255, 255) and loaded.getpixel((6, 1)) == (0, 0, 255)

    Image.new("CMYK", (12, 12), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    with Image.open(tmp_path / "cmyk.jpg") as raw:
        assert raw.mode == "CMYK"
    r, g, b = data.load_rgb(tmp_path / "cmyk.jpg").getpixel((6, 6))
    assert r > 230 and g < 25 and b < 25

    rotated = Image.new("RGB", (40, 20), (255, 0, 0))
    rotated.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    rotated.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    upright = data.load_rgb(tmp_path / "rotated.jpg")
    assert upright.size == (20, 40)
    top, bottom = upright.getpixel((10, 5)), upright.getpixel((10, 35))
    assert top[0] > 230 and top[2] < 25  # red on top
    assert bottom[2] > 230 and bottom[0] < 25  # blue below


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory):
    """Images + verified manifest: train 16/16, val 8/8, test 8/8, 40 px."""
    folder = tmp_path_factory.mktemp("stages")
    counts = {
        "train": {"cats": 16, "dogs": 16},
        "val": {"cats": 8, "dogs": 8},
        "test": {"cats": 8, "dogs": 8},
    }
    root = write_images(folder / "images", counts, size=40, seed=21)
    report = verify.verify_dataset(root, ["train", "val", "test"], counts)
    assert report.ok, report.problems
    manifest = folder / "manifest.tsv"
    io.write_tsv(manifest, report.manifest, MANIFEST_COLUMNS)
    return folder, root, manifest


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


# ---- the training loop -------------------------------------------------------------------


def _toy_problem(flip_val: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 8, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    xv = torch.randn(48, 8, generator=g)
    yv = (xv[:, 0] + 0.5 * xv[:, 1] > 0).long()
    if flip_val:
        yv = 1 - yv  # learning the training rule makes validation worse
    return TensorDataset(x, y), TensorDataset(xv, yv)


def _toy_model(train_set, init_seed=0, lr=0.05):
    torch.manual_seed(init_seed)
    head = models.Head(8, 2, dropout=0.3)
    head.fit_standardisation(train_set.tensors[0])
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    scheduler = train.warmup_then_constant(optimizer, 2, 0.5)
    return head, optimizer, scheduler


def _fit(train_set, val_set, model, optimizer, scheduler, *, epochs, early, resume=None, **kw):
    return train.fit(
        model,
        lambda epoch: data.make_loader(train_set, 16, shuffle=True, seed=5, epoch=epoch),
        data.make_loader(val_set, 64),
        optimizer,
        scheduler,
        num_classes=2,
        epochs=epochs,
        seed=5,
        device=torch.device("cpu"),
        early_stopping=early,
        resume_path=resume,
        resume_key=kw.pop("resume_key", "toy"),
        **kw,
    )


def test_early_stopping_step_respects_min_delta():
    early = train.EarlyStopping(patience=2, min_delta=1e-3)
    assert early.step(1.0, 1)
    assert not early.step(0.9995, 2)  # better, but by less than min_delta
    assert not early.should_stop
    assert not early.step(1.2, 3)
    assert early.should_stop and early.best_epoch == 1
    assert not train.EarlyStopping(patience=None).should_stop


def test_fit_stops_early_and_keeps_the_best_epoch():
    train_set, val_set = _toy_problem(flip_val=True)
    model, optimizer, scheduler = _toy_model(train_set)
    result = _fit(
        train_set, val_set, model, optimizer, scheduler, epochs=30,
        early=train.EarlyStopping(patience=2),
    )  # fmt: skip
    val_losses = [row["val_loss"] for row in result.history]
    assert result.stopped_early
    assert len(result.history) == result.best_epoch + 2 < 30
    assert result.best_epoch == 1 + int(np.argmin(val_losses))
    assert result.best_val_loss == min(val_losses)
    assert [row["epoch"] for row in result.history] == list(range(1, len(val_losses) + 1))
    # Linear warm-up over two epochs from half the lr, then the full lr.
    assert [row["lr"] for row in result.history[:3]] == pytest.approx([0.025, 0.0375, 0.05])
    # The weights kept are the best epoch's: they give exactly its validation loss.
    model.load_state_dict(result.best_state)
    loss, _ = train.evaluate(
        model, data.make_loader(val_set, 64), nn.BCEWithLogitsLoss(), 2, torch.device("cpu")
    )
    assert loss == pytest.approx(result.history[result.best_epoch - 1]["val_loss"], abs=1e-6)


class _StopAfter:
    """A loader that, like Slurm before a time limit, sends SIGUSR1 after `batches`."""

    def __init__(self, loader, batches: int = 1):
        self.loader, self.batches = loader, batches

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.batches:
                signal.raise_signal(signal.SIGUSR1)
            yield batch


def _history_without_seconds(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def test_fit_resumed_after_interruption_equals_uninterrupted(tmp_path):
    train_set, val_set = _toy_problem(flip_val=False)
    model, optimizer, scheduler = _toy_model(train_set)
    full = _fit(
        train_set, val_set, model, optimizer, scheduler, epochs=6,
        early=train.EarlyStopping(patience=10), resume=tmp_path / "full.pt",
    )  # fmt: skip
    full_weights = {k: v.clone() for k, v in model.state_dict().items()}

    resume = tmp_path / "resume.pt"
    model, optimizer, scheduler = _toy_model(train_set)
    val_loader = data.make_loader(val_set, 64)

    def interrupted_loader_for(epoch):
        loader = data.make_loader(train_set, 16, shuffle=True, seed=5, epoch=epoch)
        return _StopAfter(loader, 2) if epoch == 4 else loader

    with pytest.raises(train.TrainingInterrupted):
        train.fit(
            model, interrupted_loader_for, val_loader, optimizer, scheduler,
            num_classes=2, epochs=6, seed=5, device=torch.device("cpu"),
            early_stopping=train.EarlyStopping(patience=10), resume_path=resume,
            resume_key="toy",
        )  # fmt: skip
    saved = io.load_checkpoint(resume)
    assert saved["epoch"] == 3 and len(saved["history"]) == 3

    # A new process: other initial weights, fresh optimizer; everything comes from the file.
    model, optimizer, scheduler = _toy_model(train_set, init_seed=99)
    resumed = _fit(
        train_set, val_set, model, optimizer, scheduler, epochs=6,
        early=train.EarlyStopping(patience=10), resume=resume,
    )  # fmt: skip
    assert resumed.resumed_from == 3
    assert _history_without_seconds(resumed.history) == _history_without_seconds(full.history)
    assert resumed.best_epoch == full.best_epoch
    for key, value in full_weights.items():
        assert torch.equal(model.state_dict()[key], value), key
    for key, value in full.best_state.items():
        assert torch.equal(resumed.best_state[key], value), key


def test_fit_ignores_a_resume_file_of_other_settings(tmp_path):
    train_set, val_set = _toy_problem(flip_val=False)
    resume = tmp_path / "resume.pt"
    model, optimizer, scheduler = _toy_model(train_set)
    _fit(
        train_set, val_set, model, optimizer, scheduler, epochs=2,
        early=train.EarlyStopping(), resume=resume, resume_key="old",
    )  # fmt: skip
    assert io.load_checkpoint(resume)["epoch"] == 2
    model, optimizer, scheduler = _toy_model(train_set)
    result = _fit(
        train_set, val_set, model, optimizer, scheduler, epochs=3,
        early=train.EarlyStopping(), resume=resume, resume_key="new",
    )  # fmt: skip
    assert result.resumed_from == 0
    assert [row["epoch"] for row in result.history] == [1, 2, 3]


# ---- the stage functions -----------------------------------------------------------------


def _feature_settings(weights, augmented_views=1):
    return FeatureSettings(
        backbone="mobilenet_v2", weights=weights, image_size=32, mean=tuple(MEAN),
        std=tuple(STD), augmented_views=augmented_views, seed=3, batch_size=16,
    )  # fmt: skip


@pytest.fixture(scope="module")
def features(small_tree):
    """Cached train/val features of a random-weight MobileNetV2 at 32 px, one augmented view."""
    folder, root, manifest = small_tree
    out = {}
    for split in ("train", "val"):
        out[split] = folder / "features" / f"{split}.pt"
        stages.extract_features(
            _feature_settings("random"),
            manifest=str(manifest),
            data_root=str(root),
            split=split,
            output=str(out[split]),
            weights_file=None,
            device="cpu",
        )
    return out


def test_extracted_features_carry_their_identity(features):
    train_payload = io.load_checkpoint(features["train"])
    val_payload = io.load_checkpoint(features["val"])
    assert tuple(train_payload["features"].shape) == (64, 1280)
    assert tuple(val_payload["features"].shape) == (16, 1280)
    assert train_payload["views"].tolist() == [0] * 32 + [1] * 32
    assert train_payload["classes"] == ["cats", "dogs"]
    assert train_payload["labels"].tolist() == [0] * 16 + [1] * 16 + [0] * 16 + [1] * 16
    assert torch.isfinite(train_payload["features"]).all()
    # Random weights: the calibrated backbone travels with the features, identical per split.
    for key, value in train_payload["backbone_state"].items():
        assert torch.equal(value, val_payload["backbone_state"][key]), key
    # The augmented view differs from the plain one.
    assert not torch.equal(train_payload["features"][:32], train_payload["features"][32:])


def _interrupt_training_loader(monkeypatch, at_epoch: int):
    """Make the stages' training loop receive SIGUSR1 one batch into epoch `at_epoch`."""
    real_fit = stages.fit

    def fit(model, train_loader_for, *args, **kwargs):
        def loader_for(epoch):
            loader = train_loader_for(epoch)
            return _StopAfter(loader, 1) if epoch == at_epoch else loader

        return real_fit(model, loader_for, *args, **kwargs)

    monkeypatch.setattr(stages, "fit", fit)


def _head(features, folder, name, resume=None):
    return stages.train_head(
        HeadSettings(epochs=5, lr=1e-3, batch_size=16, dropout=0.2, seed=7),
        train_features=str(features["train"]),
        val_features=str(features["val"]),
        output=str(folder / f"{name}.pt"),
        history=str(folder / f"{name}.tsv"),
        resume=str(resume) if resume else None,
        device="cpu",
    )


def _history_rows(path):
    rows = io.read_tsv(path)
    assert list(rows[0]) == train.HISTORY_COLUMNS
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def test_train_head_resumes_to_the_same_result(features, tmp_path, monkeypatch, caplog):
    full = _head(features, tmp_path, "full")
    resume = tmp_path / "resume" / "head.pt"
    _interrupt_training_loader(monkeypatch, at_epoch=3)
    with pytest.raises(train.TrainingInterrupted):
        _head(features, tmp_path, "cut", resume)
    assert not (tmp_path / "cut.pt").exists() and not (tmp_path / "cut.tsv").exists()
    assert io.load_checkpoint(resume)["epoch"] == 2
    monkeypatch.undo()

    with caplog.at_level("INFO", logger="transfer_learning"):
        resumed = _head(features, tmp_path, "cut", resume)
    assert "train_head: resuming after epoch 2" in caplog.text
    assert not resume.exists()  # removed once the stage finished
    assert _history_rows(tmp_path / "cut.tsv") == _history_rows(tmp_path / "full.tsv")
    assert len(_history_rows(tmp_path / "full.tsv")) == 5
    assert resumed.best_epoch == full.best_epoch
    for key, value in full.head.items():
        assert torch.equal(resumed.head[key], value), key


@pytest.fixture(scope="module")
def head_checkpoint(features, small_tree):
    folder, _, _ = small_tree
    _head(features, folder, "head")
    return folder / "head.pt"


def _finetune(small_tree, head_checkpoint, folder, name, resume=None, epochs=2, workers=0):
    _, root, manifest = small_tree
    settings = FinetuneSettings(
        epochs=epochs, lr=1e-3, batch_size=16, unfreeze_blocks=None, warmup_epochs=1,
        warmup_start_factor=0.5, patience=5, min_delta=0.0, seed=7, amp=True,
    )  # fmt: skip
    return stages.finetune(
        settings,
        head_checkpoint=str(head_checkpoint),
        manifest=str(manifest),
        data_root=str(root),
        splits=["train", "val"],
        weights_file=None,
        output=str(folder / f"{name}.pt"),
        history=str(folder / f"{name}.tsv"),
        workers=workers,
        resume=str(resume) if resume else None,
        device="cpu",
    )


def test_finetune_resumes_to_the_same_result(
    small_tree, head_checkpoint, tmp_path, monkeypatch, caplog
):
    full = _finetune(small_tree, head_checkpoint, tmp_path, "full")
    assert full.trainable_parameters == pytest.approx(1.68e6, rel=0.01)
    resume = tmp_path / "resume" / "finetune.pt"
    _interrupt_training_loader(monkeypatch, at_epoch=2)
    # The interrupted run has loader workers, as in a Slurm job: same numbers as without.
    with pytest.raises(train.TrainingInterrupted):
        _finetune(small_tree, head_checkpoint, tmp_path, "cut", resume, workers=2)
    assert io.load_checkpoint(resume)["epoch"] == 1
    monkeypatch.undo()

    with caplog.at_level("INFO", logger="transfer_learning"):
        resumed = _finetune(small_tree, head_checkpoint, tmp_path, "cut", resume, workers=2)
    assert "finetune: resuming after epoch 1" in caplog.text
    assert not resume.exists()
    assert _history_rows(tmp_path / "cut.tsv") == _history_rows(tmp_path / "full.tsv")
    assert resumed.best_epoch == full.best_epoch
    for key, value in full.model.items():
        assert torch.equal(resumed.model[key], value), key
    # Fine tuning changed the last blocks and left the frozen ones alone.
    start = models.classifier_from_checkpoint(checkpoint.load_stage(head_checkpoint))
    start = start.state_dict()
    assert torch.equal(
        full.model["backbone.features.0.0.weight"], start["backbone.features.0.0.weight"]
    )
    assert torch.equal(
        full.model["backbone.features.13.conv.0.0.weight"],
        start["backbone.features.13.conv.0.0.weight"],
    )
    assert not torch.equal(
        full.model["backbone.features.18.0.weight"], start["backbone.features.18.0.weight"]
    )


def test_evaluate_matches_training_validation(small_tree, head_checkpoint, tmp_path):
    """The head evaluated on images scores the val split as training did on cached features."""
    _, root, manifest = small_tree
    rows = stages.evaluate(
        EvaluateSettings(batch_size=16),
        checkpoint_path=str(head_checkpoint),
        manifest=str(manifest),
        data_root=str(root),
        splits=["val", "test"],
        metrics_out=str(tmp_path / "metrics.tsv"),
        predictions_out=str(tmp_path / "predictions.tsv"),
        confusion_out=str(tmp_path / "confusion.tsv"),
        device="cpu",
    )
    checkpoint = io.load_checkpoint(head_checkpoint)
    assert [r["split"] for r in rows] == ["val", "test"]
    assert rows[0]["loss"] == pytest.approx(checkpoint["best_val_loss"], abs=1e-4)
    predictions = io.read_tsv(tmp_path / "predictions.tsv")
    assert len(predictions) == 32
    assert list(predictions[0]) == [
        "split",
        "path",
        "true",
        "predicted",
        "probability",
        "p_cats",
        "p_dogs",
    ]
    confusion = io.read_tsv(tmp_path / "confusion.tsv")
    for split in ("val", "test"):
        counted = {
            (r["true"], r["predicted"]): int(r["count"]) for r in confusion if r["split"] == split
        }
        listed = [(p["true"], p["predicted"]) for p in predictions if p["split"] == split]
        assert counted == {
            pair: listed.count(pair) for pair in itertools.product(["cats", "dogs"], repeat=2)
        }


def test_pretrained_path_with_a_local_weights_file(small_tree, tmp_path):
    """Weights from a file: features, head and evaluation; the head checkpoint needs the file."""
    _, root, manifest = small_tree
    torch.manual_seed(5)
    weights = tmp_path / "mine.pth"
    torch.save(torchvision.models.mobilenet_v2(num_classes=7).state_dict(), weights)
    common = dict(
        manifest=str(manifest), data_root=str(root), weights_file=str(weights), device="cpu",
    )  # fmt: skip
    for split in ("train", "val"):
        payload = stages.extract_features(
            _feature_settings("file-mine", augmented_views=0),
            split=split,
            output=str(tmp_path / f"{split}.pt"),
            **common,
        )
        assert payload.backbone_state is None  # the weights file is the backbone
    _head({"train": tmp_path / "train.pt", "val": tmp_path / "val.pt"}, tmp_path, "head")
    outputs = dict(
        checkpoint_path=str(tmp_path / "head.pt"), manifest=str(manifest), data_root=str(root),
        splits=["val"], metrics_out=str(tmp_path / "m.tsv"),
        predictions_out=str(tmp_path / "p.tsv"), confusion_out=str(tmp_path / "c.tsv"),
        device="cpu",
    )  # fmt: skip
    with pytest.raises(ValueError, match="needs its backbone weights"):
        stages.evaluate(EvaluateSettings(batch_size=16), **outputs)
    rows = stages.evaluate(EvaluateSettings(batch_size=16), weights_file=str(weights), **outputs)
    best = io.load_checkpoint(tmp_path / "head.pt")["best_val_loss"]
    assert rows[0]["loss"] == pytest.approx(best, abs=1e-4)


# ---- atomic files ------------------------------------------------------------------------


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "deep" / "table.tsv"
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as partial:
            partial.write_text("half a table")
            raise RuntimeError("killed")
    assert not target.exists()
    assert list((tmp_path / "deep").iterdir()) == []

    target.write_text("old\n")
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_path(target) as partial:
            partial.write_text("new")
            raise KeyboardInterrupt
    assert target.read_text() == "old\n"
    assert list((tmp_path / "deep").iterdir()) == [target]

    with io.atomic_path(target) as partial:
        partial.write_text("new\n")
    assert target.read_text() == "new\n"
    assert list((tmp_path / "deep").iterdir()) == [target]


def test_tables_and_checkpoints_round_trip(tmp_path):
    rows = [{"a": 1, "b": 0.123456789, "c": None}, {"a": 2, "b": 1e-9, "c": "x y"}]
    io.write_tsv(tmp_path / "t.tsv", rows)
    assert (tmp_path / "t.tsv").read_text() == "a\tb\tc\n1\t0.123457\t\n2\t1e-09\tx y\n"
    assert io.read_tsv(tmp_path / "t.tsv")[1] == {"a": "2", "b": "1e-09", "c": "x y"}
    io.save_checkpoint({"w": torch.ones(2), "names": ["a"]}, tmp_path / "c.pt")
    assert io.load_checkpoint(tmp_path / "c.pt")["names"] == ["a"]
    with pytest.raises(FileNotFoundError):
        io.load_checkpoint(tmp_path / "absent.pt")


class _Pickled:
    pass


def test_load_checkpoint_refuses_arbitrary_objects(tmp_path):
    torch.save({"thing": _Pickled()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="[Ww]eights only"):
        io.load_checkpoint(tmp_path / "evil.pt")


# ---- a resume never continues a run whose inputs changed ----------------------------------


def _tree_copy_with_new_val_images(small_tree, folder):
    """The same data set with every validation image replaced; manifest verified again."""
    _, root, _ = small_tree
    new_root = folder / "images"
    shutil.copytree(root, new_root)
    shutil.rmtree(new_root / "val")
    other = write_images(folder / "other", {"val": {"cats": 8, "dogs": 8}}, size=40, seed=99)
    shutil.copytree(other / "val", new_root / "val")
    counts = {"train": {"cats": 16, "dogs": 16}, "val": {"cats": 8, "dogs": 8}}
    counts["test"] = counts["val"]
    report = verify.verify_dataset(new_root, ["train", "val", "test"], counts)
    assert report.ok, report.problems
    manifest = folder / "manifest.tsv"
    io.write_tsv(manifest, report.manifest, MANIFEST_COLUMNS)
    return folder, new_root, manifest


def test_finetune_never_resumes_after_its_images_changed(
    small_tree, head_checkpoint, tmp_path, monkeypatch, caplog
):
    """Stopped after epoch 1, then every validation image replaced: the rerun starts over."""
    resume = tmp_path / "resume" / "finetune.pt"
    _interrupt_training_loader(monkeypatch, at_epoch=2)
    with pytest.raises(train.TrainingInterrupted):
        _finetune(small_tree, head_checkpoint, tmp_path, "cut", resume)
    assert io.load_checkpoint(resume)["epoch"] == 1
    monkeypatch.undo()

    changed = _tree_copy_with_new_val_images(small_tree, tmp_path / "changed")
    fresh = _finetune(changed, head_checkpoint, tmp_path, "fresh")
    with caplog.at_level("INFO", logger="transfer_learning"):
        after = _finetune(changed, head_checkpoint, tmp_path, "cut", resume)
    assert "resuming" not in caplog.text
    assert "written for other settings or other inputs" in caplog.text
    assert _history_rows(tmp_path / "cut.tsv") == _history_rows(tmp_path / "fresh.tsv")
    assert after.best_val_loss == fresh.best_val_loss


def test_train_head_never_resumes_on_other_features(features, tmp_path, monkeypatch, caplog):
    resume = tmp_path / "resume" / "head.pt"
    _interrupt_training_loader(monkeypatch, at_epoch=3)
    with pytest.raises(train.TrainingInterrupted):
        _head(features, tmp_path, "cut", resume)
    monkeypatch.undo()
    # Other validation features (here: the training split's): same settings, other input.
    other = {"train": features["train"], "val": tmp_path / "val.pt"}
    saved = checkpoint.load_features(features["train"])
    saved.split = "val"
    checkpoint.save(saved, other["val"])
    with caplog.at_level("INFO", logger="transfer_learning"):
        _head(other, tmp_path, "cut", resume)
    assert "resuming" not in caplog.text
    assert len(_history_rows(tmp_path / "cut.tsv")) == 5


def test_resume_key_covers_settings_and_every_input():
    settings = HeadSettings(epochs=5, lr=1e-3, batch_size=16, dropout=0.2, seed=7)
    inputs = {"train": "a", "val": "b"}
    key = checkpoint.resume_key(settings, inputs)
    assert key == checkpoint.resume_key(settings, dict(inputs))
    assert key != checkpoint.resume_key(settings.replace(lr=1e-4), inputs)
    assert key != checkpoint.resume_key(settings, {**inputs, "val": "c"})
    assert checkpoint.fingerprint(torch.ones(2)) != checkpoint.fingerprint(torch.ones(3))
    assert checkpoint.fingerprint(torch.tensor(5)) != checkpoint.fingerprint(torch.tensor(6))


# ---- no split and batch size may crash training ------------------------------------------


@pytest.mark.parametrize("n, batch", [(6, 5), (33, 32), (3, 2), (17, 16), (2, 2)])
def test_training_loaders_never_end_on_a_batch_of_one(n, batch):
    dataset = TensorDataset(torch.zeros(n, 1), torch.zeros(n))
    loader = data.make_loader(dataset, batch, shuffle=True, seed=1)
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        sizes = [len(y) for _, y in loader]
        assert min(sizes) > 1 or n == 1, sizes
        assert sum(sizes) >= n - 1


def test_six_training_images_with_batch_five_train_every_stage(tmp_path):
    """BatchNorm in train mode on a last batch of one image used to crash fine tuning and
    the calibration of a random backbone (a 1 x 1 feature map at 32 px)."""
    counts = {"train": {"cats": 3, "dogs": 3}, "val": {"cats": 2, "dogs": 2}}
    counts["test"] = counts["val"]
    root = write_images(tmp_path / "images", counts, size=40, seed=4)
    report = verify.verify_dataset(root, ["train", "val", "test"], counts)
    manifest = tmp_path / "manifest.tsv"
    io.write_tsv(manifest, report.manifest, MANIFEST_COLUMNS)
    tree = (tmp_path, root, manifest)
    feature_files = {}
    for split in ("train", "val"):
        feature_files[split] = tmp_path / f"{split}.pt"
        stages.extract_features(
            _feature_settings("random", augmented_views=0).replace(batch_size=5),
            manifest=str(manifest), data_root=str(root), split=split,
            output=str(feature_files[split]), device="cpu",
        )  # fmt: skip
    stages.train_head(
        HeadSettings(epochs=2, lr=1e-3, batch_size=5, dropout=0.2, seed=7),
        train_features=str(feature_files["train"]), val_features=str(feature_files["val"]),
        output=str(tmp_path / "head.pt"), history=str(tmp_path / "head.tsv"), device="cpu",
    )  # fmt: skip
    settings = FinetuneSettings(
        epochs=2, lr=1e-3, batch_size=5, unfreeze_blocks=None, warmup_epochs=0,
        patience=2, min_delta=0.0, seed=7,
    )  # fmt: skip
    result = stages.finetune(
        settings, head_checkpoint=str(tmp_path / "head.pt"), manifest=str(manifest),
        data_root=str(root), splits=["train", "val"], output=str(tmp_path / "ft.pt"),
        history=str(tmp_path / "ft.tsv"), device="cpu",
    )  # fmt: skip
    assert result.epochs_run == 2
    assert tree
