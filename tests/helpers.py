"""Helpers shared by several test files: import them from here, never from conftest.py
(fixtures only) or from another test file.

Everything here uses the real thing: the `snakemake` command line of the project's venv,
real image files. Importing this module puts workflow_scripts/ on sys.path (conftest.py
imports it, so every test file can import transfer_learning); it does not import PyTorch.

Paths and constants
    REPO, SCRIPTS             the repository root (the folder holding the Snakefile), and its
                              workflow_scripts/
    VENV_BIN, SNAKEMAKE       the venv's bin/ (it runs pytest, snakemake and the rules' python)
                              and its snakemake
    SMALL_COUNTS, SMALL_DATA  the small data set's counts and its root relative to a workdir
    STAGE_OUTPUTS             every stage's outputs up to results/summary.tsv (small_run's targets)
    GPU_RULES                 the rules that request a GPU
    MEAN, STD                 ImageNet normalisation
Snakemake runs
    snakemake(workdir, *args) run `snakemake -s REPO/Snakefile -d workdir *args`
    snake_env(**extra)        the environment of a run: venv first on PATH, no inherited profile
    assert_ok(proc, what)     fail with the end of Snakemake's output attached
    tail(text, lines)         the last lines of a text
    overlay(path, dict)       write a YAML config overlay
    small_config(data_root)   a config overlay that runs the whole workflow in ~30 s
    job_stats(output)         {rule: count} from Snakemake's "Job stats" table
    jobs(output)              every job block Snakemake printed (rule, output, wildcards, ...)
    copy_workdir(src, dst)    a copy of a finished workdir, .snakemake metadata included
Images
    write_images(root, counts) a valid <root>/<split>/<class>/*.jpg data set
    COUNTS                    the small tree of the verification tests (cats/dogs 4, 2, 2)
    ODD_NAMES, add_oddities(folder)  nine valid images of unusual kinds and names
    jpeg_bytes(colour, ...)   the bytes of a one-colour JPEG
    truncated(path), corrupt(path)  a JPEG's bytes cut off, and with a broken marker
Training
    stage_checkpoint(**fields) a small but real head checkpoint record
    StopAfter(loader, batches) a loader that sends SIGUSR1 after `batches`, as Slurm does
"""

from __future__ import annotations

import copy
import io
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "workflow_scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from transfer_learning.demo import make_demo_dataset  # noqa: E402
from transfer_learning.settings import deep_merge  # noqa: E402

if TYPE_CHECKING:
    from transfer_learning.checkpoint import StageCheckpoint

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
    "results/baseline/finetune/usage.tsv",
    *(
        f"results/baseline/eval/{stage}/{name}.tsv"
        for stage in ("head", "finetune")
        for name in ("metrics", "predictions", "confusion", "usage")
    ),
    "results/summary.tsv",
]

# The rules that request a GPU (resources: gpu=1).
GPU_RULES = {"extract_features", "finetune", "evaluate", "predict"}

# ImageNet normalisation.
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


# ---- Snakemake runs ----------------------------------------------------------------------


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


# ---- images ------------------------------------------------------------------------------


def write_images(root, counts: dict, size: int = 48, seed: int = 0) -> Path:
    """Write a valid `<root>/<split>/<class>/<class>.<n>.jpg` data set; returns root.

    The images are the demo's synthetic shapes (transfer_learning.demo), one shape per
    class, so a model can learn them; every image has distinct content.
    """
    root = Path(root)
    make_demo_dataset(root, counts, image_size=size, seed=seed)
    return root


# The small tree of the verification tests (test_verify, test_data_checks).
COUNTS = {
    "train": {"cats": 4, "dogs": 4},
    "val": {"cats": 2, "dogs": 2},
    "test": {"cats": 2, "dogs": 2},
}


def jpeg_bytes(colour=(200, 30, 30), size=(32, 32), mode="RGB", **save) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, "JPEG", **save)
    return buffer.getvalue()


def truncated(path) -> bytes:
    raw = path.read_bytes()
    return raw[: len(raw) * 6 // 10]


def corrupt(path) -> bytes:
    """A JPEG that PIL opens but cannot decode: its quantisation-table marker is broken."""
    raw = bytearray(path.read_bytes())
    marker = raw.index(b"\xff\xdb")
    raw[marker] = 0x00
    return bytes(raw)


# Valid images of unusual kinds and names: add_oddities() writes them.
ODD_NAMES = [
    "grey.jpg",
    "alpha.png",
    "cmyk.jpg",
    "plain.png",
    "rotated.jpg",
    "tiny.jpg",
    "my cat photo.jpg",
    "chat_éléphant_ü.jpg",
    "UPPER.JPG",
]


def add_oddities(folder):
    """Valid images of unusual kinds and names, nine of them."""
    Image.new("L", (40, 30), 90).save(folder / "grey.jpg")
    rgba = Image.new("RGBA", (30, 30), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 15, 30))
    rgba.save(folder / "alpha.png")
    Image.new("CMYK", (30, 30), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    Image.new("RGB", (36, 36), (10, 200, 10)).save(folder / "plain.png")
    rotated = Image.new("RGB", (40, 20), (255, 0, 0))
    rotated.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    rotated.save(folder / "rotated.jpg", exif=exif.tobytes(), quality=95)
    Image.new("RGB", (16, 16), (120, 60, 30)).save(folder / "tiny.jpg")
    Image.new("RGB", (33, 33), (1, 2, 3)).save(folder / "my cat photo.jpg")
    Image.new("RGB", (34, 34), (4, 5, 6)).save(folder / "chat_éléphant_ü.jpg")
    (folder / "UPPER.JPG").write_bytes(jpeg_bytes((9, 9, 99)))


# ---- training ----------------------------------------------------------------------------


def stage_checkpoint(**fields) -> StageCheckpoint:
    """A small but real head checkpoint record (2 classes, 4 features); fields override."""
    from transfer_learning.checkpoint import ModelIdentity, StageCheckpoint  # imports torch

    values = dict(
        stage="head",
        identity=ModelIdentity(
            backbone="mobilenet_v2", weights="random", image_size=32,
            mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], seed=1, classes=["cats", "dogs"],
        ),
        feature_dim=4, dropout=0.2, settings={}, best_epoch=1, best_val_loss=0.5,
        epochs_run=1, train_seconds=0.1, head={},
    )  # fmt: skip
    values.update(fields)
    return StageCheckpoint(**values)


class StopAfter:
    """A loader that, like Slurm before a time limit, sends SIGUSR1 after `batches`."""

    def __init__(self, loader, batches: int = 1):
        self.loader, self.batches = loader, batches

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.batches:
                signal.raise_signal(signal.SIGUSR1)
            yield batch
