"""transfer_learning.stages without Snakemake: extract_features, train_head, finetune and
evaluate on real images (the small_tree fixture), their resume after an interruption and
their fresh start when an input changed. Real torchvision models with random weights (or
a local state dict)."""

from __future__ import annotations

import dataclasses
import itertools
import shutil

import pytest
import torch
import torchvision
from helpers import MEAN, STD, StopAfter, write_images
from transfer_learning import checkpoint, data, io, models, stages, train, verify
from transfer_learning.settings import (
    EvaluateSettings,
    FeatureSettings,
    FinetuneSettings,
    HeadSettings,
)
from transfer_learning.verify import MANIFEST_COLUMNS


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
            return StopAfter(loader, 1) if epoch == at_epoch else loader

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


# ---- no split and batch size may crash training ------------------------------------------


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


# ---- fine tuning starts where the head ended -----------------------------------------------


def _finetune_settings(**changes):
    return FinetuneSettings(
        epochs=2, lr=1e-3, batch_size=16, unfreeze_blocks=None, warmup_epochs=1,
        patience=5, min_delta=0.0, seed=7,
    ).replace(**changes)  # fmt: skip


def test_model_for_finetune_gives_the_heads_logits_before_any_step(
    small_tree, features, head_checkpoint
):
    """Same un-augmented images: the assembled model on pixels == the head on cached features."""
    _, root, manifest = small_tree
    start = checkpoint.load_stage(head_checkpoint)
    model, frozen = stages.model_for_finetune(start, _finetune_settings())
    model.eval()
    identity = start.identity
    rows = data.split_records(data.read_manifest(manifest), "val")
    dataset = data.ImageDataset(
        root, rows, identity.classes, identity.image_size, identity.mean, identity.std
    )
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    cached = checkpoint.load_features(features["val"])
    with torch.no_grad():
        from_pixels = model(images.contiguous(memory_format=torch.channels_last))
        from_features = model.head(cached.features[cached.views == 0])
    assert torch.allclose(from_pixels, from_features, atol=1e-5), (
        (from_pixels - from_features).abs().max()
    )


@pytest.mark.parametrize(
    "batchnorm, weights, trains",
    [
        ("frozen", "random", False),
        ("train", "random", True),
        ("auto", "random", True),  # learnt from scratch: statistics must follow the weights
        ("auto", "IMAGENET1K_V1", False),  # pretrained: keep the head's statistics
    ],
)
def test_batchnorm_setting_decides_what_trains_in_train_mode(
    head_checkpoint, batchnorm, weights, trains
):
    start = checkpoint.load_stage(head_checkpoint)
    start.identity = dataclasses.replace(start.identity, weights=weights)
    model, frozen = stages.model_for_finetune(start, _finetune_settings(batchnorm=batchnorm))
    models.train_mode(model, frozen)
    norms = models.batchnorm_layers(model)
    last = norms[-1]  # in the unfrozen last block
    assert last.weight.requires_grad  # its weights train either way
    assert last.training == trains
    assert not norms[0].training  # a frozen block's statistics never move
    assert model.head.dropout.training


@pytest.mark.parametrize("scale", [1.0, 1e-10])
def test_standardisation_statistics_are_those_of_the_plain_view(scale):
    """Block by block (never a copy of the features), but torch's numbers over view 0."""
    generator = torch.Generator().manual_seed(4)
    plain = 3 * scale + scale * 1e-3 * torch.randn(50, 6, generator=generator)
    augmented = 100 * scale + torch.randn(50, 6, generator=generator)
    features = checkpoint.FeatureFile(
        identity=None, split="train", features=torch.cat([plain, augmented]),
        labels=torch.zeros(100, dtype=torch.int64),
        views=torch.tensor([0] * 50 + [1] * 50), paths=[str(i) for i in range(50)],
    )  # fmt: skip
    mean, std = stages._plain_view_statistics(features, rows=7)
    torch.testing.assert_close(mean, plain.double().mean(0).float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(std, plain.double().std(0).float(), rtol=1e-5, atol=0)
