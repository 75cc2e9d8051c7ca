#!/usr/bin/env python3
"""Does fine tuning beat the head? BatchNorm frozen/train x horizontal flip on/off, on real
image sets that ship inside installable packages, plus the demo.

Each set is written as `<root>/<split>/<class>/*.png` and run through the real workflow
(one Snakemake run per set, the four combinations as experiments of one sweep); the table
holds head and fine-tune test accuracy of every combination.

    python tools/study_finetune.py [--sets digits faces textures demo] [--out study]

Sets (all real photographs or scans, none generated):
- digits: scikit-learn's handwritten digits (1,797 8x8 scans, 10 classes). Digits are not
  mirror-symmetric: a flipped 2 is no 2.
- faces: scikit-image's `lfw_subset` (100 faces from Labeled Faces in the Wild, 100 other
  patches, 25x25 grey).
- textures: 48x48 patches of scikit-image's brick, grass and gravel photographs (3 classes;
  train, val and test patches come from separate bands of each photograph).
- demo: the workflow's generated shapes (config/demo.yaml), for reference.

No pretrained weights can be downloaded here: every backbone starts from random weights
(BatchNorm calibrated on the training images), so the absolute numbers are far below what
ImageNet weights give; the comparison between settings is the point.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow_scripts"))

from transfer_learning.demo import make_demo_dataset  # noqa: E402

SPLITS = ("train", "val", "test")
COMBINATIONS = {"finetune.batchnorm": ["frozen", "train"], "augment.horizontal_flip": [True, False]}


def _split_indices(labels: np.ndarray, seed: int, fractions=(0.6, 0.2, 0.2)) -> dict:
    """Stratified split: the same share of each class in every split."""
    rng = np.random.default_rng(seed)
    parts = {s: [] for s in SPLITS}
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cut1 = int(round(fractions[0] * len(members)))
        cut2 = cut1 + int(round(fractions[1] * len(members)))
        parts["train"] += members[:cut1].tolist()
        parts["val"] += members[cut1:cut2].tolist()
        parts["test"] += members[cut2:].tolist()
    return parts


def _write(root: Path, images: np.ndarray, labels: np.ndarray, names: list[str], seed: int):
    """images: N x H x W (grey, 0..255) -> <root>/<split>/<class>/<n>.png; returns counts."""
    counts = {s: {} for s in SPLITS}
    for split, indices in _split_indices(labels, seed).items():
        for i in indices:
            label = names[labels[i]]
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i].astype(np.uint8)).save(folder / f"{i:05d}.png")
            counts[split][label] = counts[split].get(label, 0) + 1
    return counts


def digits(root: Path, seed: int) -> dict:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.clip(data.images * (255 / 16), 0, 255)
    return _write(root, images, data.target, [f"digit{d}" for d in range(10)], seed)


def faces(root: Path, seed: int) -> dict:
    from skimage import data

    images = data.lfw_subset() * 255  # 100 faces, then 100 other patches
    labels = np.array([0] * 100 + [1] * 100)
    return _write(root, images, labels, ["face", "other"], seed)


def textures(root: Path, seed: int, patch: int = 48) -> dict:
    """Patches of three photographs; each split from its own band of rows, so no test patch
    overlaps a training patch."""
    from skimage import data

    rng = np.random.default_rng(seed)
    bands = {"train": (0.0, 0.6, 60), "val": (0.6, 0.8, 20), "test": (0.8, 1.0, 20)}
    counts = {s: {} for s in SPLITS}
    for label, photo in (
        ("brick", data.brick()),
        ("grass", data.grass()),
        ("gravel", data.gravel()),
    ):
        height, width = photo.shape[:2]
        for split, (top, bottom, n) in bands.items():
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            rows = (int(top * height), int(bottom * height) - patch)
            for i in range(n):
                y, x = rng.integers(*rows), rng.integers(0, width - patch)
                Image.fromarray(photo[y : y + patch, x : x + patch]).save(folder / f"{i:04d}.png")
            counts[split][label] = n
    return counts


def demo(root: Path, seed: int) -> dict:
    counts = {"train": {"circles": 60, "squares": 60}}
    counts["val"] = counts["test"] = {"circles": 30, "squares": 30}
    make_demo_dataset(root, counts, image_size=64, seed=seed)
    return counts


SETS = {"digits": digits, "faces": faces, "textures": textures, "demo": demo}


def run_set(name: str, out: Path, seed: int, cores: int) -> list[dict]:
    workdir = out / name
    if workdir.exists():
        shutil.rmtree(workdir)
    counts = SETS[name](workdir / "data", seed)
    config = {
        "data": {"root": "data", "expected_counts": counts},
        "model": {"weights": None, "image_size": 64 if name == "demo" else 32},
        "seed": seed,
        "head": {"epochs": 15, "lr": 1.0e-3},
        "finetune": {
            "epochs": 25,
            "lr": 1.0e-3,
            "unfreeze_blocks": 19,
            "warmup_epochs": 1,
            "patience": 6,
        },
        "experiments": {"study": {"grid": COMBINATIONS}},
    }
    (workdir / "study.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    started = time.monotonic()
    subprocess.run(
        [
            "snakemake",
            "-s",
            str(REPO / "Snakefile"),
            "-d",
            str(workdir),
            "--cores",
            str(cores),
            "results/summary.tsv",
            "--configfile",
            str(workdir / "study.yaml"),
        ],  # fmt: skip
        check=True,
        stdout=open(workdir / "snakemake.log", "w"),
        stderr=subprocess.STDOUT,
        env={
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        },
    )
    with open(workdir / "results" / "summary.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    table = {}
    for row in rows:
        if not row.get("finetune.batchnorm"):
            continue  # the configuration's own "baseline" experiment, a copy of one point
        key = (row["finetune.batchnorm"], row["augment.horizontal_flip"])
        table.setdefault(key, {})[row["stage"]] = float(row["test_accuracy"])
    n = sum(sum(c.values()) for c in counts.values())
    minutes = (time.monotonic() - started) / 60
    print(f"{name}: {n} images, {minutes:.1f} min", file=sys.stderr)
    return [
        {
            "set": name,
            "batchnorm": key[0],
            "flip": key[1],
            "head": scores.get("head"),
            "finetune": scores.get("finetune"),
        }
        for key, scores in sorted(table.items())
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--out", type=Path, default=Path("study"))
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    results = [row for name in args.sets for row in run_set(name, args.out, args.seed, args.cores)]
    print("| set | finetune.batchnorm | augment.horizontal_flip | head | fine-tune | difference |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['set']} | {r['batchnorm']} | {r['flip']} | {r['head']:.3f} | "
            f"{r['finetune']:.3f} | {r['finetune'] - r['head']:+.3f} |"
        )


if __name__ == "__main__":
    main()
