"""Shared helpers and fixtures: real Snakemake runs on small generated image sets.

Everything here runs the real thing: the `snakemake` command line of the project's venv,
real torchvision models (random weights), real JPEG files. Expensive runs are
session-scoped so that every test file can share them.

Helpers
    REPO                      the repository root (the folder holding the Snakefile)
    snakemake(workdir, *args) run `snakemake -s REPO/Snakefile -d workdir *args`
    write_images(root, counts) a valid <root>/<split>/<class>/*.jpg data set
    overlay(path, dict)       write a YAML config overlay
    small_config(data_root)   a config overlay that runs the whole workflow in ~30 s
    job_stats(output)         {rule: count} from Snakemake's "Job stats" table
    jobs(output)              every job block Snakemake printed (rule, output, wildcards, ...)
Fixtures
    demo_run    (session) workdir of one full run of config/demo.yaml
    small_run   (session) workdir of one run of small_config() on write_images(), up to
                the summary (targets STAGE_OUTPUTS)
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "workflow_scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from transfer_learning.demo import make_demo_dataset  # noqa: E402
from transfer_learning.settings import deep_merge  # noqa: E402

# The venv that runs pytest also runs snakemake and the rules' `python`.
VENV_BIN = Path(sys.executable).parent
SNAKEMAKE = VENV_BIN / "snakemake" if (VENV_BIN / "snakemake").exists() else "snakemake"

# Two classes, a few dozen images: enough for every stage, small enough for 2 CPU cores.
SMALL_COUNTS = {
    "train": {"cats": 24, "dogs": 24},
    "val": {"cats": 12, "dogs": 12},
    "test": {"cats": 12, "dogs": 12},
}
# Relative to the Snakemake workdir, so a copied workdir carries its own data.
SMALL_DATA = "data/images"

STAGE_OUTPUTS = [
    "results/data/manifest.tsv",
    "results/data/counts.tsv",
    "results/baseline/head/model.pt",
    "results/baseline/head/history.tsv",
    "results/baseline/finetune/model.pt",
    "results/baseline/finetune/history.tsv",
    *(
        f"results/baseline/eval/{stage}/{name}.tsv"
        for stage in ("head", "finetune")
        for name in ("metrics", "predictions", "confusion")
    ),
    "results/summary.tsv",
]


def snake_env(**extra: str) -> dict:
    """The environment of a Snakemake run: venv first on PATH, no inherited profile."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    for name in ("SNAKEMAKE_PROFILE", "SLURM_JOB_ID", "SLURM_CPUS_PER_TASK"):
        env.pop(name, None)
    env.update(extra)
    return env


def snakemake(
    workdir,
    *args,
    timeout: int = 600,
    cores: int | None = 2,
    env: dict | None = None,
    cwd=None,
    snakefile=None,
) -> subprocess.CompletedProcess:
    """Run the real snakemake CLI: `snakemake -s REPO/Snakefile -d workdir [--cores 2] *args`.

    Runs under `timeout -k 10 <timeout>` (exit status 124 when it ran out of time). The
    output of both streams is merged, in order, into `.stdout`; `.stderr` holds the same
    text, so either attribute works (Snakemake writes nearly everything to stderr).
    `cores=None` leaves --cores out (for --lint, --list-rules, or a profile that sets it);
    `snakefile` runs another copy of the workflow.
    Put targets before `--configfile`, which takes every following word as a file.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    command = [
        "timeout", "-k", "10", str(timeout),
        str(SNAKEMAKE), "-s", str(snakefile or REPO / "Snakefile"), "-d", str(workdir),
    ]  # fmt: skip
    if cores is not None:
        command += ["--cores", str(cores)]
    command += [str(a) for a in args]
    proc = subprocess.run(
        command,
        cwd=str(cwd or workdir),
        env=env or snake_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout, proc.stdout)


def tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def assert_ok(proc: subprocess.CompletedProcess, what: str = "snakemake") -> None:
    """Fail with the end of Snakemake's output (and the rule logs it names) attached."""
    if proc.returncode != 0:
        pytest.fail(f"{what} exited {proc.returncode}:\n{tail(proc.stdout, 120)}")


def write_images(root, counts: dict, size: int = 48, seed: int = 0) -> Path:
    """Write a valid `<root>/<split>/<class>/<class>.<n>.jpg` data set; returns root.

    The images are the demo's synthetic shapes (transfer_learning.demo), one shape per
    class, so a model can learn them; every image has distinct content.
    """
    root = Path(root)
    make_demo_dataset(root, counts, image_size=size, seed=seed)
    return root


def overlay(path, config: dict) -> Path:
    """Write `config` as a YAML overlay for `--configfile`; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def small_config(data_root=SMALL_DATA, counts: dict | None = None, **overrides) -> dict:
    """A config overlay that runs every stage in seconds on CPU.

    Random weights, 32 px, 3 head epochs, 2 fine-tuning epochs, batch size 16, one
    augmented view; `counts` (default SMALL_COUNTS) becomes data.expected_counts.
    Keyword overrides deep-merge per top-level section, e.g.
    `small_config(root, finetune={"lr": 1e-4})`.
    """
    config = {
        "data": {
            "root": str(data_root),
            "expected_counts": copy.deepcopy(counts or SMALL_COUNTS),
        },
        "model": {"backbone": "mobilenet_v2", "weights": None, "image_size": 32},
        "features": {"augmented_views": 1, "batch_size": 16},
        "head": {"epochs": 3, "lr": 1.0e-3, "batch_size": 16},
        "finetune": {
            "epochs": 2,
            "lr": 1.0e-4,
            "batch_size": 16,
            "warmup_epochs": 1,
            "patience": 2,
        },
        "evaluate": {"batch_size": 16},
    }
    return deep_merge(config, overrides)


def job_stats(output: str) -> dict[str, int]:
    """{rule: count} from the first "Job stats" table of Snakemake's output ({} if none)."""
    match = re.search(r"Job stats:\n\s*job\s+count\n[-\s]+\n((?:\S+\s+\d+\n?)+)", output)
    if not match:
        return {}
    stats = {}
    for line in match.group(1).splitlines():
        name, count = line.split()
        if name != "total":
            stats[name] = int(count)
    return stats


def jobs(output: str) -> list[dict]:
    """The job blocks Snakemake printed ("rule x:" / "localrule x:" and their fields).

    Each is {"rule": name, "local": bool, field: text, ...}; "output" and "input" are
    also split into lists under "outputs"/"inputs". A job printed twice (dry-run and
    run) appears twice.
    """
    found = []
    for match in re.finditer(r"^(local)?rule (\w+):\n((?:    \S.*\n?)*)", output, re.M):
        job = {"rule": match.group(2), "local": bool(match.group(1))}
        for line in match.group(3).splitlines():
            key, _, value = line.strip().partition(": ")
            job[key] = value
        job["outputs"] = [p for p in job.get("output", "").split(", ") if p]
        job["inputs"] = [p for p in job.get("input", "").split(", ") if p]
        found.append(job)
    return found


def copy_workdir(source, target) -> Path:
    """A copy of a finished workdir, modification times and .snakemake metadata included."""
    shutil.copytree(source, target, symlinks=True)
    return Path(target)


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
