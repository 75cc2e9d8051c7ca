"""Tracking the data set at scale, through the real Snakemake command line.

The data set is one tracked value of verify_dataset (`data_listing`, one os.scandir walk),
not one Snakemake input a file. Here: on a tree of a few thousand (hard-linked) images, an
added, removed or replaced image re-plans verification and nothing else changes when nothing
changed; and the walk happens in the Snakemake that plans verification, never in the
Snakemake a Slurm job starts for a stage that does not read the images.

Which processes walk the data is observed, not inferred: a `sitecustomize` module on
PYTHONPATH installs an audit hook (PEP 578) in every Python process of a run, logging each
os.scandir / os.listdir of a path inside the data root.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from helpers import (
    REPO,
    SMALL_DATA,
    STAGE_OUTPUTS,
    assert_ok,
    copy_workdir,
    job_stats,
    jobs,
    overlay,
    small_config,
    snake_env,
    snakemake,
    write_images,
)

MANIFEST = "results/data/manifest.tsv"
ORIGINALS = {
    "train": {"cats": 4, "dogs": 4},
    "val": {"cats": 2, "dogs": 2},
    "test": {"cats": 2, "dogs": 2},
}
LINKS = {"train": 300, "val": 30, "test": 30}  # hard links of each original image

WALK_LOGGER = """
import os, sys

_log, _root = os.environ.get("WALK_LOG"), os.environ.get("WALK_ROOT")


def _walk_hook(event, args):
    if event not in ("os.scandir", "os.listdir") or not args or isinstance(args[0], int):
        return
    path = os.path.abspath(os.fsdecode(args[0] if args[0] is not None else "."))
    if path == _root or path.startswith(_root + os.sep):
        with open(_log, "a") as handle:
            handle.write(f"{os.getpid()}\\t{event}\\t{path}\\t{' '.join(sys.argv[:4])}\\n")


if _log and _root:
    sys.addaudithook(_walk_hook)
"""


@pytest.fixture(scope="module")
def large_tree(tmp_path_factory):
    """(workdir, data root, overlay) with a few thousand images, verified for real once."""
    workdir = tmp_path_factory.mktemp("large_tree")
    root = write_images(workdir / "data" / "images", ORIGINALS, size=32, seed=11)
    counts = {}
    for split, per_class in ORIGINALS.items():
        counts[split] = {}
        for label in per_class:
            folder = root / split / label
            originals = sorted(folder.iterdir())
            for i in range(LINKS[split]):
                for image in originals:
                    os.link(image, folder / f"{image.stem}.link{i}{image.suffix}")
            counts[split][label] = len(originals) * (LINKS[split] + 1)
    # Hard links are copies of one picture: duplicates are expected, not a leak here.
    config = small_config(
        str(root), counts, data={"duplicates": "ignore", "near_duplicate_distance": 0}
    )
    config_file = overlay(workdir / "large.yaml", config)
    assert_ok(snakemake(workdir, MANIFEST, "--configfile", config_file), "verify the tree")
    return workdir, root, config_file


def _planned(workdir, config_file):
    proc = snakemake(workdir, MANIFEST, "-n", "--configfile", config_file)
    assert_ok(proc)
    return proc


def _verify_reason(proc) -> str:
    assert job_stats(proc.stdout) == {"verify_dataset": 1}, job_stats(proc.stdout)
    (job,) = jobs(proc.stdout)
    assert "Params have changed" in job["reason"], job["reason"]
    return job["reason"]


def test_large_tree_add_remove_replace_replan_verification(large_tree, tmp_path):
    workdir, root, config_file = large_tree
    total = sum(sum(per_class.values()) for per_class in ORIGINALS.values())
    total += sum(ORIGINALS[s][c] * LINKS[s] for s in ORIGINALS for c in ORIGINALS[s])
    assert total > 2500
    assert "Nothing to be done" in _planned(workdir, config_file).stdout

    cats = root / "train" / "cats"
    image = sorted(cats.iterdir())[0]

    added = cats / "added.jpg"
    added.write_bytes(image.read_bytes())
    assert f"now: '{total + 1} files" in _verify_reason(_planned(workdir, config_file))
    added.unlink()

    aside = tmp_path / image.name
    image.rename(aside)  # a rename keeps the modification time: back as it was after
    assert f"now: '{total - 1} files" in _verify_reason(_planned(workdir, config_file))
    aside.rename(image)

    # Replaced by other bytes of the same length: only the modification time tells.
    replaced = sorted(cats.iterdir())[-1]
    content = bytearray(replaced.read_bytes())
    replaced.unlink()  # a new file, not a write through the hard link into its twins
    content[-3] ^= 0xFF
    replaced.write_bytes(bytes(content))
    reason = _verify_reason(_planned(workdir, config_file))
    assert re.search(rf"now: '{total} files", reason), reason


def test_only_the_planning_snakemake_walks_the_data(small_run, tmp_path):
    """The Snakemake that plans walks the data (it tracks them); the Snakemake that a Slurm
    job starts for train_head, which reads features, not images, never does.

    The job-side command is the one the executor plugins build
    (snakemake_interface_executor_plugins RealExecutor.format_job_exec): --target-jobs,
    --allowed-rules and --mode remote, run here without Slurm.
    """
    workdir = copy_workdir(small_run, tmp_path / "work")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(WALK_LOGGER)
    root = str((workdir / SMALL_DATA).resolve())
    config = workdir / "config" / "small.yaml"

    def env(log):
        return snake_env(PYTHONPATH=str(hook), WALK_LOG=str(log), WALK_ROOT=root)

    planning = tmp_path / "planning.log"
    proc = snakemake(workdir, *STAGE_OUTPUTS, "-n", "--configfile", config, env=env(planning))
    assert_ok(proc)
    assert "Nothing to be done" in proc.stdout
    assert planning.is_file(), "the planning Snakemake did not walk the data: hook not active?"

    job_side = tmp_path / "job_side.log"
    before = (workdir / "results/baseline/head/model.pt").stat().st_mtime_ns
    command = [
        sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
        "--target-jobs", "train_head:experiment=baseline", "--allowed-rules", "train_head",
        "--cores", "1", "--attempt", "1", "--force-use-threads", "--nolock",
        "--ignore-incomplete", "--configfiles", str(config), "--mode", "remote",
    ]  # fmt: skip
    ran = subprocess.run(
        command, cwd=workdir, env=env(job_side), capture_output=True, text=True, timeout=300
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    # The job ran (its checkpoint is new), and nothing in it looked at the images.
    assert (workdir / "results/baseline/head/model.pt").stat().st_mtime_ns != before
    assert not job_side.exists(), job_side.read_text()
