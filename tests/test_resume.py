"""Surviving the cluster: a fine-tune stopped by a real signal resumes where it left off.

Slurm sends SIGTERM (time limit, preemption, scancel) or the profile's early SIGUSR1 to the
training process; a node failure kills everything at once. In both cases a re-run through
Snakemake must lose at most the current epoch, never a finished stage, and end with exactly
the history and metrics of a run that was never interrupted (on CPU).
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import (
    REPO,
    SMALL_COUNTS,
    SMALL_DATA,
    STAGE_OUTPUTS,
    assert_ok,
    copy_workdir,
    overlay,
    small_config,
    snake_env,
    snakemake,
    tail,
    write_images,
)

# Long enough to be stopped mid-way, short enough for CI; no early stop, so the
# interrupted and the reference run train the same number of epochs.
EPOCHS = 8
CONFIG = small_config(finetune={"epochs": EPOCHS, "patience": 50, "lr": 1.0e-3})
UPSTREAM = [
    "results/data/manifest.tsv",
    "results/data/counts.tsv",
    "results/baseline/head/model.pt",
    "results/baseline/head/history.tsv",
]
COMPARED = [
    "results/baseline/finetune/history.tsv",
    "results/baseline/eval/finetune/metrics.tsv",
    "results/baseline/eval/finetune/predictions.tsv",
]


def prepare(workdir: Path) -> Path:
    write_images(workdir / SMALL_DATA, SMALL_COUNTS, size=48, seed=11)
    return overlay(workdir / "config" / "resume.yaml", CONFIG)


def without_seconds(path: Path) -> list[list[str]]:
    """A TSV's cells, minus the wall-clock column that no two runs share."""
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    if "seconds" in rows[0]:
        drop = rows[0].index("seconds")
        rows = [row[:drop] + row[drop + 1 :] for row in rows]
    return rows


def fingerprint(workdir: Path, paths) -> dict[str, tuple[int, str]]:
    return {
        p: (
            (workdir / p).stat().st_mtime_ns,
            hashlib.sha256((workdir / p).read_bytes()).hexdigest(),
        )
        for p in paths
    }


def finetune_pids(workdir: Path) -> list[int]:
    """PIDs of the finetune entry point running in `workdir` (from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if any(part.endswith(b"finetune.py") for part in cmdline) and cwd == str(workdir):
            # The entry point itself, not the shell that started it.
            if b"python" in Path(cmdline[0].decode()).name.encode() or cmdline[0].endswith(
                b"finetune.py"
            ):
                pids.append(int(entry.name))
    return pids


def wait_for_epoch(workdir: Path, process: subprocess.Popen, epoch: int, timeout=300) -> None:
    log = workdir / "logs" / "finetune" / "baseline.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and f"finetune epoch {epoch}/{EPOCHS}" in log.read_text():
            return
        if process.poll() is not None:
            pytest.fail(f"snakemake ended before epoch {epoch}:\n{tail(process.stdout.read())}")
        time.sleep(0.05)
    pytest.fail(f"fine tuning did not reach epoch {epoch} in {timeout} s")


def start_snakemake(workdir: Path, config: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            "timeout",
            "-k",
            "10",
            "600",
            str(Path(snake_env()["PATH"].split(os.pathsep)[0]) / "snakemake"),
            "-s",
            str(REPO / "Snakefile"),
            "-d",
            str(workdir),
            "--cores",
            "2",
            *(args or STAGE_OUTPUTS),
            "--configfile",
            str(config),
        ],  # fmt: skip
        cwd=workdir,
        env=snake_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """A run that was never interrupted."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    config = prepare(workdir)
    assert_ok(snakemake(workdir, *STAGE_OUTPUTS, "--configfile", config))
    return workdir


def upstream_then_start_finetune(workdir: Path):
    config = prepare(workdir)
    # Everything before fine tuning, finished and fingerprinted.
    assert_ok(snakemake(workdir, *UPSTREAM, "--configfile", config))
    before = fingerprint(workdir, UPSTREAM)
    return config, before, start_snakemake(workdir, config)


def assert_resumed_identically(workdir: Path, reference: Path, config: Path, before: dict):
    rerun = snakemake(workdir, *STAGE_OUTPUTS, "--rerun-incomplete", "--configfile", config)
    assert_ok(rerun, "re-run after the interruption")
    log = (workdir / "logs" / "finetune" / "baseline.log").read_text()
    assert "finetune: resuming after epoch" in log, log
    resumed_after = int(log.split("resuming after epoch ")[1].split()[0])
    assert 1 <= resumed_after < EPOCHS
    # Only the epochs after the saved one were trained again.
    trained = [line for line in log.splitlines() if "finetune epoch " in line]
    assert len(trained) == EPOCHS - resumed_after, trained
    # Nothing finished upstream was computed again.
    assert fingerprint(workdir, UPSTREAM) == before
    for name in ("extract_features", "train_head", "verify_dataset"):
        assert f"rule {name}:" not in rerun.stdout
    for path in COMPARED:
        assert without_seconds(workdir / path) == without_seconds(reference / path), path
    # The resume state is gone once the stage's outputs are complete.
    assert not (workdir / "results" / ".resume" / "baseline" / "finetune.pt").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_to_training_process_saves_and_the_rerun_resumes(tmp_path, reference, signum):
    """Slurm's signal reaches the training process at a random epoch; it stops cleanly."""
    workdir = tmp_path / "interrupted"
    config, before, process = upstream_then_start_finetune(workdir)
    epoch = random.Random(int(signum)).randint(2, EPOCHS - 3)
    wait_for_epoch(workdir, process, epoch)
    pids = finetune_pids(workdir)
    assert pids, "the finetune process was not found"
    for pid in pids:
        os.kill(pid, signum)
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0, tail(output)
    assert "finetune" in output and "Error in rule finetune" in output, tail(output)
    log = (workdir / "logs" / "finetune" / "baseline.log").read_text()
    assert f"received {signal.Signals(signum).name}" in log, log
    assert "state saved" in log, log
    # Snakemake removed the failed job's outputs; the resume state outside them is kept.
    assert not (workdir / "results" / "baseline" / "finetune" / "model.pt").exists()
    assert (workdir / "results" / ".resume" / "baseline" / "finetune.pt").exists()
    assert_resumed_identically(workdir, reference, config, before)


def test_killed_workflow_reruns_incomplete_without_recomputing_upstream(tmp_path, reference):
    """A node failure: Snakemake and the job die at once (SIGKILL), mid fine-tune."""
    workdir = tmp_path / "killed"
    config, before, process = upstream_then_start_finetune(workdir)
    wait_for_epoch(workdir, process, 3)
    os.killpg(process.pid, signal.SIGKILL)
    for pid in finetune_pids(workdir):
        os.kill(pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert (workdir / "results" / ".resume" / "baseline" / "finetune.pt").exists()
    # What the README tells a user after a crash: the dead run's lock goes first.
    assert_ok(snakemake(workdir, "--unlock", "--configfile", config))
    assert_resumed_identically(workdir, reference, config, before)


def test_changed_settings_never_resume_a_stale_run(tmp_path):
    """A resume file written for other settings is ignored, and the stage starts over."""
    workdir = tmp_path / "stale"
    config, _, process = upstream_then_start_finetune(workdir)
    wait_for_epoch(workdir, process, 2)
    for pid in finetune_pids(workdir):
        os.kill(pid, signal.SIGTERM)
    process.communicate(timeout=300)
    changed = overlay(
        workdir / "config" / "changed.yaml",
        small_config(finetune={"epochs": EPOCHS, "patience": 50, "lr": 5.0e-4}),
    )
    assert_ok(snakemake(workdir, *STAGE_OUTPUTS, "--rerun-incomplete", "--configfile", changed))
    log = (workdir / "logs" / "finetune" / "baseline.log").read_text()
    assert "written for other settings" in log, log
    assert "resuming after" not in log
    assert len([line for line in log.splitlines() if "finetune epoch " in line]) == EPOCHS


def test_interrupted_forcerun_is_never_forgotten(tmp_path, reference):
    """After a finished run, `--forcerun finetune` is stopped half-way (a time limit).

    Snakemake deletes the failed job's checkpoint and history; the evaluation files of the
    earlier run are still there. The next plain run must rebuild the checkpoint (resuming the
    training) and everything after it, not say "Nothing to be done".
    """
    workdir = copy_workdir(reference, tmp_path / "work")
    config = workdir / "config" / "resume.yaml"
    (workdir / "logs" / "finetune" / "baseline.log").unlink()  # the earlier run's
    process = start_snakemake(workdir, config, "--forcerun", "finetune")
    wait_for_epoch(workdir, process, 3)
    for pid in finetune_pids(workdir):
        os.kill(pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0, tail(output)
    assert not (workdir / "results/baseline/finetune/model.pt").exists()
    assert (workdir / "results/baseline/eval/finetune/metrics.tsv").exists()

    rerun = snakemake(workdir, "--rerun-incomplete", "--configfile", config)
    assert_ok(rerun, "plain re-run after the interrupted forcerun")
    assert "Nothing to be done" not in rerun.stdout
    log = (workdir / "logs" / "finetune" / "baseline.log").read_text()
    assert "finetune: resuming after epoch" in log, log
    assert (workdir / "results/baseline/finetune/model.pt").exists()
    for path in COMPARED:
        assert without_seconds(workdir / path) == without_seconds(reference / path), path
