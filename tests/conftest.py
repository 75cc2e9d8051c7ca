"""Fixtures shared by several test files (fixtures only: helpers are in helpers.py).

Everything here runs the real thing: real Snakemake runs on small generated image sets,
real verification. Expensive runs are session-scoped so that every test file can share
them.

Fixtures
    demo_run    (session) workdir of one full run of config/demo.yaml
    small_run   (session) workdir of one run of small_config() on write_images(), up to
                the summary (targets STAGE_OUTPUTS), with predict, export and training
                logs (MODEL_OUTPUTS; predict.images: photos/)
    small_tree  (module) (folder, image root, verified manifest): train 16/16, val 8/8,
                test 8/8, 40 px; for the package's unit tests (test_data, test_stages)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import (
    REPO,
    SMALL_COUNTS,
    SMALL_DATA,
    STAGE_OUTPUTS,
    assert_ok,
    corrupt,
    overlay,
    small_config,
    snakemake,
    write_images,
)
from transfer_learning import io, verify
from transfer_learning.verify import MANIFEST_COLUMNS

# ---- session runs shared by test files -----------------------------------------------


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """Workdir of one complete run of the demo workflow (`--configfile config/demo.yaml`).

    Shared by every test that reads real demo outputs (workflow, plots, report). Do not
    modify it: copy it with copy_workdir() first.
    """
    workdir = tmp_path_factory.mktemp("demo_run")
    proc = snakemake(workdir, "--configfile", REPO / "config" / "demo.yaml", timeout=900)
    (workdir / "snakemake_output.txt").write_text(proc.stdout)
    assert_ok(proc, "demo workflow")
    return workdir


@pytest.fixture(scope="session")
def small_run(tmp_path_factory) -> Path:
    """Workdir of one run of small_config() on write_images(SMALL_COUNTS) up to summary.tsv.

    Targets are STAGE_OUTPUTS (every stage, not the plots: demo_run covers those) and
    MODEL_OUTPUTS (predict and export of both stages). The data live inside the workdir
    (data/images), the overlay at config/small.yaml and Snakemake's output at
    snakemake_output.txt. `predict.images` is PHOTOS (see _write_photos); TensorBoard and
    MLflow (results/mlflow.db) logs are on. Do not modify it: copy_workdir() first.
    """
    workdir = tmp_path_factory.mktemp("small_run")
    root = write_images(workdir / SMALL_DATA, SMALL_COUNTS, size=48, seed=7)
    _write_photos(root / "test", workdir / PHOTOS)
    config = small_config(
        predict={"images": PHOTOS},
        logging={"tensorboard": True, "mlflow": "sqlite:///results/mlflow.db"},
    )
    config = overlay(workdir / "config" / "small.yaml", config)
    proc = snakemake(workdir, *STAGE_OUTPUTS, *MODEL_OUTPUTS, "--configfile", config, timeout=600)
    (workdir / "snakemake_output.txt").write_text(proc.stdout)
    assert_ok(proc, "small workflow")
    return workdir


# The folder small_run predicts, inside its workdir, and the outputs of predict and export.
PHOTOS = "photos"
MODEL_OUTPUTS = [
    f"results/baseline/{rule}/{stage}.{ext}"
    for stage in ("head", "finetune")
    for rule, ext in (("predict", "tsv"), ("export", "onnx"))
]


def _write_photos(test_split: Path, folder: Path) -> None:
    """The test split's images in another layout (two levels, no class folders), plus a
    corrupt JPEG (broken.jpg), a text file (notes.txt) and a hidden file, which predict
    skips: unreadable ones with a warning each, the hidden one silently."""
    for number, image in enumerate(sorted(test_split.rglob("*.jpg"))):
        target = folder / ("2024/a" if number % 2 else "b") / image.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(image, target)
    (folder / "broken.jpg").write_bytes(corrupt(image))
    (folder / "notes.txt").write_text("not an image\n")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")


# ---- a verified image tree for the package's unit tests ------------------------------------


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
