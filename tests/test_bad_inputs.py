"""The rest of the bad-input matrix, end to end through Snakemake.

Data problems and config values are covered in test_verify.py, test_data_checks.py,
test_settings.py and test_config.py; here: weights files that are missing or of another
architecture (a clear error naming the culprit, nothing downstream started), and valid
oddities that must go through every stage (each odd file ends up evaluated), with batch
sizes larger than the splits.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from helpers import (
    ODD_NAMES,
    SMALL_COUNTS,
    SMALL_DATA,
    STAGE_OUTPUTS,
    add_oddities,
    assert_ok,
    job_stats,
    overlay,
    small_config,
    snakemake,
    write_images,
)
from PIL import Image


def _run_with_weights(workdir, weights):
    write_images(workdir / SMALL_DATA, SMALL_COUNTS, size=48, seed=3)
    config = overlay(workdir / "config.yaml", small_config(model={"weights": weights}))
    return snakemake(workdir, *STAGE_OUTPUTS, "--configfile", config)


def test_missing_weights_file_is_named_before_anything_runs(tmp_path):
    run = _run_with_weights(tmp_path / "w", "resources/my-weights/missing.pth")
    assert run.returncode != 0
    assert "resources/my-weights/missing.pth" in run.stdout
    assert "MissingInputException" in run.stdout or "Missing input files" in run.stdout
    assert not (tmp_path / "w" / "results" / "data").exists()  # not even verification


def test_weights_of_another_architecture_name_the_keys(tmp_path):
    workdir = tmp_path / "w"
    weights = workdir / "resources" / "resnet18-local.pth"
    weights.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    run = _run_with_weights(workdir, str(weights.relative_to(workdir)))
    assert run.returncode != 0
    assert "Error in rule extract_features" in run.stdout
    log = next((workdir / "logs" / "extract_features").rglob("*.log")).read_text()
    assert "do not fit backbone MobileNetV2" in log and "missing keys: features.0.0.weight" in log
    assert "unexpected keys: bn1.bias" in log
    for later in ("train_head", "finetune", "evaluate"):
        assert f"rule {later}:" not in run.stdout, later
    assert not (workdir / "results" / "baseline").exists()


def _make_distinct(folder, split):
    """Change one pixel of each oddity: the same bytes in two splits is (rightly) a leak."""
    shift = 1 if split == "val" else 2
    for name in ODD_NAMES:
        path = folder / name
        with Image.open(path) as image:
            image.load()
            exif = image.info.get("exif")
            pixel = image.getpixel((0, 0))
            changed = (
                tuple((c + shift * 40) % 256 for c in pixel)
                if isinstance(pixel, tuple)
                else (pixel + shift * 40) % 256
            )
            image.putpixel((0, 0), changed)
            kind = "PNG" if path.suffix.lower() == ".png" else "JPEG"
            image.save(path, kind, **({"exif": exif} if exif else {}))


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory):
    """Every oddity in train, val and test, and batch sizes far above the split sizes."""
    workdir = tmp_path_factory.mktemp("oddities")
    root = write_images(workdir / SMALL_DATA, SMALL_COUNTS, size=48, seed=5)
    for split in ("train", "val", "test"):
        add_oddities(root / split / "cats")
        if split != "train":
            _make_distinct(root / split / "cats", split)
    counts = {
        split: {"cats": per["cats"] + len(ODD_NAMES), "dogs": per["dogs"]}
        for split, per in SMALL_COUNTS.items()
    }
    big = 10_000
    config = small_config(
        counts=counts,
        features={"batch_size": big},
        head={"batch_size": big},
        finetune={"batch_size": big},
        evaluate={"batch_size": big},
    )
    run = snakemake(workdir, *STAGE_OUTPUTS, "--configfile", overlay(workdir / "c.yaml", config))
    assert_ok(run, "run with odd images and batch sizes larger than every split")
    return workdir


@pytest.mark.parametrize("name", ODD_NAMES)
def test_odd_image_goes_through_every_stage(odd_run, name):
    with open(odd_run / "results/baseline/eval/finetune/predictions.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    paths = {(r["split"], r["path"]) for r in rows}
    for split in ("val", "test"):
        assert (split, f"{split}/cats/{name}") in paths, (split, name)
    features = torch.load(
        next((odd_run / "results" / "features").glob("*/train.pt")), weights_only=True
    )
    assert f"train/cats/{name}" in features["paths"]


def test_batch_size_larger_than_the_split_trains_one_batch_an_epoch(odd_run):
    with open(odd_run / "results/baseline/finetune/history.tsv", newline="") as handle:
        history = list(csv.DictReader(handle, delimiter="\t"))
    assert len(history) == 2
    assert all(0.0 <= float(r["train_acc"]) <= 1.0 for r in history)


# ---- names and values that break shell lines, odd modes, symbolic links -------------------

# Quotes, $, backticks, ; and a newline in class names; CJK letters for the plots.
HOSTILE_CLASSES = ["chien d'arrêt", 'say "$HOME" `id`; rm -rf $x', "猫\nneko"]
HOSTILE_ROOT = 'data/it\'s "our" $data; `x`'
HOSTILE_WEIGHTS = "resources/w'e$ights `v1`.pth"


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    """One real run on data whose names are hostile to any shell line.

    Three classes named with quotes, `$`, backticks, `;`, a newline and CJK letters, under a
    data root whose path has them too; a local weights file whose path has them, given as an
    experiment's override; a 16-bit greyscale PNG; one class folder of the test split a
    symbolic link to a folder elsewhere; 8 training images with batch size 7 (a last batch
    of one image).
    """
    workdir = tmp_path_factory.mktemp("hostile")
    counts = {"train": 3, "val": 2, "test": 2}
    expected = {s: dict.fromkeys(HOSTILE_CLASSES, n) for s, n in counts.items()}
    expected["train"][HOSTILE_CLASSES[2]] = 2
    source = write_images(workdir / "generated", {s: {"a": 3, "b": 3, "c": 3} for s in counts})
    root = workdir / HOSTILE_ROOT
    elsewhere = workdir / "elsewhere"
    for split, per_class in expected.items():
        for (label, n), generated in zip(per_class.items(), "abc", strict=True):
            target = root / split / label
            if split == "test" and generated == "a":
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(elsewhere, target_is_directory=True)
                target = elsewhere
            target.mkdir(parents=True)
            for image in sorted((source / split / generated).iterdir())[:n]:
                (target / image.name).write_bytes(image.read_bytes())
    gradient = np.tile(np.linspace(0, 65535, 48).astype("<u2"), (48, 1))
    Image.frombytes("I;16", (48, 48), gradient.tobytes()).save(
        root / "train" / HOSTILE_CLASSES[0] / "grey16.png"
    )
    expected["train"][HOSTILE_CLASSES[0]] += 1
    weights = workdir / HOSTILE_WEIGHTS
    weights.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.mobilenet_v2().state_dict(), weights)
    config = small_config(
        HOSTILE_ROOT,
        expected,
        head={"batch_size": 7},
        finetune={"batch_size": 7, "epochs": 1},
        experiments={"baseline": {"model": {"weights": HOSTILE_WEIGHTS}}},
    )
    config["data"]["near_duplicate_distance"] = 0  # generated shapes of one class look alike
    run = snakemake(workdir, "--configfile", overlay(workdir / "c.yaml", config), timeout=600)
    (workdir / "snakemake_output.txt").write_text(run.stdout)
    assert_ok(run, "run on hostile names")
    return workdir, root, expected


def _tsv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def test_hostile_names_reach_every_stage_intact(hostile_run):
    workdir, _, expected = hostile_run
    manifest = _tsv(workdir / "results/data/manifest.tsv")
    assert sorted({r["class"] for r in manifest}) == sorted(HOSTILE_CLASSES)
    assert len(manifest) == sum(sum(per.values()) for per in expected.values())
    metrics = _tsv(workdir / "results/baseline/eval/finetune/metrics.tsv")
    for label in HOSTILE_CLASSES:
        assert f"recall_{label}" in metrics[0]
    assert all(0.0 <= float(r["roc_auc"]) <= 1.0 for r in metrics)  # 3 classes: macro OvR
    predictions = _tsv(workdir / "results/baseline/eval/head/predictions.tsv")
    assert {f"p_{label}" for label in HOSTILE_CLASSES} <= set(predictions[0])
    assert {r["true"] for r in predictions} == set(HOSTILE_CLASSES)
    features = torch.load(
        next((workdir / "results/features").glob("*/train.pt")), weights_only=True
    )
    assert features["weights"].startswith("file-")
    assert "grey16.png" in " ".join(features["paths"])
    for plot in ("head_confusion_matrix.png", "finetune_mistakes.png", "learning_curves.png"):
        assert (workdir / "results/baseline/plots" / plot).stat().st_size > 5_000


def test_symlinked_class_folder_is_verified_and_tracked(hostile_run, tmp_path):
    workdir, root, _ = hostile_run
    manifest = _tsv(workdir / "results/data/manifest.tsv")
    linked = [r for r in manifest if r["split"] == "test" and r["class"] == HOSTILE_CLASSES[0]]
    assert len(linked) == 2
    config = workdir / "c.yaml"
    assert "Nothing to be done" in snakemake(workdir, "-n", "--configfile", config).stdout
    image = workdir / "elsewhere" / Path(linked[0]["path"]).name
    original = image.read_bytes()
    try:
        (workdir / "elsewhere" / ".DS_Store").write_bytes(b"junk")
        assert "Nothing to be done" in snakemake(workdir, "-n", "--configfile", config).stdout
        image.write_bytes(original + b"\0")  # replaced behind the link
        dry = snakemake(workdir, "-n", "--configfile", config)
        assert "verify_dataset" in job_stats(dry.stdout), dry.stdout[-3000:]
    finally:
        image.write_bytes(original)
        (workdir / "elsewhere" / ".DS_Store").unlink()
