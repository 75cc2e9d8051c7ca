"""Fixtures shared by several test files (fixtures only: helpers are in helpers.py).

Everything here runs the real thing: real Snakemake runs on small generated image sets,
real verification. Expensive runs are session-scoped so that every test file can share
them.

Fixtures
    demo_run    (session) workdir of one full run of config/demo.yaml
    small_run   (session) workdir of one run of small_config() on write_images(), up to
                the summary (targets STAGE_OUTPUTS)
    small_tree  (module) (folder, image root, verified manifest): train 16/16, val 8/8,
                test 8/8, 40 px; for the package's unit tests (test_data, test_stages)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import (
    REPO,
    SMALL_COUNTS,
    SMALL_DATA,
    STAGE_OUTPUTS,
    assert_ok,
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

    Targets are STAGE_OUTPUTS (every stage, not the plots: demo_run covers those). The
    data live inside the workdir (data/images), the overlay at config/small.yaml and
    Snakemake's output at snakemake_output.txt. Do not modify it: copy_workdir() first.
    """
    workdir = tmp_path_factory.mktemp("small_run")
    write_images(workdir / SMALL_DATA, SMALL_COUNTS, size=48, seed=7)
    config = overlay(workdir / "config" / "small.yaml", small_config())
    proc = snakemake(workdir, *STAGE_OUTPUTS, "--configfile", config, timeout=600)
    (workdir / "snakemake_output.txt").write_text(proc.stdout)
    assert_ok(proc, "small workflow")
    return workdir


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
