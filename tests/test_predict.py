"""Predicting a folder of unlabelled images: which files are found and tracked, the same
probabilities as evaluate for the same images, unreadable files skipped and reported, an
added image re-running predict, and clear errors. The workflow-level tests read the shared
small_run, whose predict.images is photos/: the test split in another layout, plus
broken.jpg (corrupt), notes.txt and a hidden .DS_Store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    SCRIPTS,
    STAGE_OUTPUTS,
    assert_ok,
    copy_workdir,
    job_stats,
    jobs,
    overlay,
    small_config,
    snake_env,
    snakemake,
)
from transfer_learning.image_files import tracking_digest, walk_images
from transfer_learning.io import read_tsv

PHOTOS = "photos"  # small_run's predict.images
PREDICTIONS = [f"results/baseline/predict/{stage}.tsv" for stage in ("head", "finetune")]


def _tree(root: Path) -> Path:
    for path in ("b/2.jpg", "a/deep/er/1.png", "top.jpg", ".hidden/x.jpg", "a/.DS_Store"):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(b"x" * len(path))
    return root


def test_walk_finds_every_visible_file_in_any_layout(tmp_path):
    root = _tree(tmp_path / "photos")
    outside = tmp_path / "elsewhere"
    (outside / "c.jpg").parent.mkdir()
    (outside / "c.jpg").write_bytes(b"c")
    os.symlink(outside, root / "linked")
    os.symlink(root, root / "b" / "loop")  # a link back up: walked once, not forever
    found = walk_images(root)
    assert found.paths == ["a/deep/er/1.png", "b/2.jpg", "linked/c.jpg", "top.jpg"]
    assert found.sizes == [len("a/deep/er/1.png"), len("b/2.jpg"), 1, len("top.jpg")]
    assert not found.problems


def test_digest_follows_images_not_hidden_files(tmp_path):
    root = _tree(tmp_path / "photos")
    before = tracking_digest(root)
    assert before.startswith("3 files, ")
    (root / "a" / "._1.png").write_bytes(b"AppleDouble")
    assert tracking_digest(root) == before
    (root / "b" / "3.jpg").write_bytes(b"new")
    assert tracking_digest(root).startswith("4 files, ")
    (root / "b" / "3.jpg").write_bytes(b"NEW")
    os.utime(root / "b" / "3.jpg", ns=(1, 1))
    assert tracking_digest(root) not in (before, tracking_digest(tmp_path / "nowhere"))


def test_predictions_match_evaluate_for_the_same_images(small_run):
    """Same decoding, preprocessing and model as evaluate: the same probabilities."""
    test_images = sorted(p.name for p in (small_run / "data/images/test").rglob("*.jpg"))
    for stage in ("head", "finetune"):
        rows = read_tsv(small_run / f"results/baseline/predict/{stage}.tsv")
        assert list(rows[0]) == ["path", "predicted", "probability", "p_cats", "p_dogs"]
        paths = [row["path"] for row in rows]
        assert paths == sorted(paths) and sorted(Path(p).name for p in paths) == test_images
        assert {str(Path(p).parent) for p in paths} == {"2024/a", "b"}
        evaluated = {
            Path(row["path"]).name: row
            for row in read_tsv(small_run / f"results/baseline/eval/{stage}/predictions.tsv")
            if row["split"] == "test"
        }
        for row in rows:
            same = evaluated[Path(row["path"]).name]
            for column in ("p_cats", "p_dogs"):
                assert float(row[column]) == pytest.approx(float(same[column]), abs=2e-6)
            assert row["predicted"] == same["predicted"]
            highest = max(float(row["p_cats"]), float(row["p_dogs"]))
            assert float(row["probability"]) == pytest.approx(highest)


def test_unreadable_files_are_skipped_each_with_a_warning_and_counted(small_run):
    for stage in ("head", "finetune"):
        lines = (small_run / f"logs/predict/baseline/{stage}.log").read_text().splitlines()
        warnings = [line for line in lines if "WARNING" in line]
        assert len(warnings) == 2, warnings
        assert "skipped broken.jpg: " in warnings[0] and "skipped notes.txt: " in warnings[1]
        assert "not an image file" in warnings[1]
        assert "24 images predicted, 2 unreadable files skipped" in lines[-1]
        usage = read_tsv(small_run / f"results/baseline/predict/{stage}_usage.tsv")
        assert [(r["pass"], r["images"]) for r in usage] == [("predict", "24")]


def test_an_added_image_reruns_predict_only(small_run, tmp_path):
    workdir = copy_workdir(small_run, tmp_path / "work")
    config = workdir / "config" / "small.yaml"
    proc = snakemake(workdir, *STAGE_OUTPUTS, *PREDICTIONS, "-n", "--configfile", config)
    assert_ok(proc)
    assert "Nothing to be done" in proc.stdout
    new = workdir / PHOTOS / "new" / "one more.jpg"
    new.parent.mkdir()
    shutil.copy(next((workdir / PHOTOS / "b").iterdir()), new)
    proc = snakemake(workdir, *STAGE_OUTPUTS, *PREDICTIONS, "-n", "--configfile", config)
    assert_ok(proc)
    assert job_stats(proc.stdout) == {"predict": 2}
    reason = jobs(proc.stdout)[0]["reason"]
    assert "Params have changed" in reason and "27 files" in reason, reason


def test_missing_folder_stops_the_workflow_naming_the_key(tmp_path):
    config = overlay(tmp_path / "c.yaml", small_config(predict={"images": "no/such/folder"}))
    proc = snakemake(tmp_path / "work", "-n", "--configfile", config, timeout=120)
    assert proc.returncode != 0
    assert "config key predict.images: no/such/folder is not a folder" in proc.stdout


def test_by_hand_a_folder_without_one_readable_image_is_an_error(small_run, tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"")
    (folder / "b.txt").write_text("text")
    output = tmp_path / "out.tsv"
    proc = subprocess.run(
        [
            sys.executable, str(SCRIPTS / "predict.py"),
            "--checkpoint", str(small_run / "results/baseline/head/model.pt"),
            "--images", str(folder), "--output", str(output), "--device", "cpu",
        ],
        env=snake_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout
    assert "skipped a.jpg" in proc.stdout and "skipped b.txt" in proc.stdout
    assert "none of the 2 files under" in proc.stdout and "predict.images" in proc.stdout
    assert not output.exists()
