"""The rest of the bad-input matrix, end to end through Snakemake.

Data problems and config values are covered in test_verify.py and test_config.py; here:
weights files that are missing or of another architecture (a clear error naming the
culprit, nothing downstream started), and valid oddities that must go through every stage
(each odd file ends up evaluated), with batch sizes larger than the splits.
"""

from __future__ import annotations

import csv

import pytest
import torch
import torchvision
from conftest import (
    SMALL_COUNTS,
    SMALL_DATA,
    STAGE_OUTPUTS,
    assert_ok,
    overlay,
    small_config,
    snakemake,
    write_images,
)
from PIL import Image
from test_verify import ODD_NAMES, _add_oddities


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
        _add_oddities(root / split / "cats")
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
