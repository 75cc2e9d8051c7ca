"""`python tools/benchmark.py scale`: the workflow at 100k-1M images and 500 experiments.

Each figure is measured side by side with its reference in the same run, alternating
within every repeat, and printed as a Markdown table of medians and ratios:

  - `snakemake -n` on the demo vs `snakemake --version` (what parsing the workflow costs);
  - `snakemake -n` with --images files under data.root vs the demo, and with --million
    files (each in a fresh working directory; the files are hard links to a few real JPEGs);
  - `snakemake -n` of a 500-experiment grid (25 x 20 values of two keys) on the demo;
  - verify_dataset (the rule's entry point, the rule's threads) on --images real-size
    JPEGs (500 x 375, photo-like, quality 90) vs plain decoding (PIL open + convert) of the
    same files with the same threads (wall time and CPU time per image), and
    verify_dataset's peak memory at --images and at a fifth of them;
  - peak memory of extract_features (MobileNetV2, 1280 features per image, 32 px images)
    and of train_head (synthetic 1280-float features), at a fifth of --images and at
    --images, as a fixed part plus a part per 100k feature rows.

Every program runs as its own process; peak memory is the process's maximum resident set
(getrusage via wait4; memory-mapped feature pages count, as they do for Slurm) and the sum
over its processes (sampled). Usage (README "Benchmark" has the figures):
  python tools/benchmark.py scale [--images 100000] [--million 1000000] [--repeats 3]
  python tools/benchmark.py scale --images 20000 --million 100000 --repeats 1   # quick
  python tools/benchmark.py scale --figures verify --work /tmp/bench   # one kind, kept trees
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil  # a dependency of Snakemake
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "workflow_scripts"
DEMO_CONFIG = REPO / "config" / "demo.yaml"
SPLITS = {"train": 0.8, "val": 0.1, "test": 0.1}
# Distinct photos behind the hard links: one per 50 files of the largest tree, at most
# PHOTOS (made in seconds; ext4 allows 65,000 links to one file). Each split gets its own,
# so the large trees hold no image in two splits (a leak would fail verification).
PHOTOS = 2000
GRID = {"finetune.lr": [round(1e-5 * (k + 1), 10) for k in range(25)]}
GRID["head.dropout"] = [round(0.02 * k, 2) for k in range(20)]

# Plain decoding, the reference of verification: the same walk order, PIL open + convert
# of every file with a pool of the same number of threads, nothing kept. Run as its own
# Python process (imports PIL only), as verification is.
PLAIN_DECODING = """
import os, sys
from concurrent.futures import ThreadPoolExecutor
from PIL import Image
root, threads, splits = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
paths = [
    os.path.join(root, split, label, name)
    for split in splits
    for label in sorted(os.listdir(os.path.join(root, split)))
    for name in sorted(os.listdir(os.path.join(root, split, label)))
]
def decode(path):
    with Image.open(path) as image:
        image.convert("RGB")
with ThreadPoolExecutor(threads) as pool:
    for _ in pool.map(decode, paths, chunksize=16):
        pass
print(len(paths))
"""


# ---- running and measuring one program ----------------------------------------------------


def environment() -> dict:
    """The workflow's environment: this Python's scripts (snakemake, the venv) first."""
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def measure(
    command: list[str], *, cwd=None, log: Path | None = None, total: bool = False
) -> tuple[float, float, float, float]:
    """Run `command`; return its wall seconds, its peak memory in MiB, twice, and its CPU
    seconds (user + system, its worker processes and threads included):

    - the largest single process (getrusage via wait4: the program, or one of its loader
      workers; exact, but it includes this process's resident memory at the fork, which
      is why this process never imports PyTorch);
    - all its processes together (proportional set sizes summed, sampled 5 times a
      second from its start; 0 unless `total`): what a Slurm job's memory limit sees of a
      program with worker processes.
    """
    output = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115
    started = time.perf_counter()
    peak_total = [0.0]
    try:
        process = subprocess.Popen(
            command, cwd=cwd, env=environment(), stdout=output, stderr=subprocess.STDOUT
        )
        done = threading.Event()
        sampler = threading.Thread(target=_sample_total, args=(process.pid, done, peak_total))
        if total:
            sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        done.set()
        if total:
            sampler.join()
        process.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if log:
            output.close()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        tail = log.read_text()[-3000:] if log else ""
        raise SystemExit(f"failed ({process.returncode}): {' '.join(command)}\n{tail}")
    cpu = usage.ru_utime + usage.ru_stime
    return seconds, usage.ru_maxrss / 1024, peak_total[0] / 2**20, cpu


def _sample_total(pid: int, done: threading.Event, peak: list[float]) -> None:
    """Keep in peak[0] the largest sum of PSS over `pid` and its descendants."""
    try:
        root = psutil.Process(pid)
    except psutil.Error:
        return
    # From the start: a toy-sized run can end before a first sample 0.2 s in.
    while True:
        total = 0
        try:
            for process in [root, *root.children(recursive=True)]:
                total += process.memory_full_info().pss
            peak[0] = max(peak[0], total)
        except psutil.Error:
            pass  # a process ended while being read: the next sample counts
        if done.wait(0.2):
            return


# ---- data ----------------------------------------------------------------------------------


def photo(rng: np.random.Generator, width: int = 500, height: int = 375) -> Image.Image:
    """Photo-like content: smooth colour fields (a 16 x 12 picture scaled up) plus sensor
    grain; saved at quality 90 this is about 50 KB, like a real 500 x 375 photo."""
    fields = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    smooth = np.asarray(fields.resize((width, height), Image.Resampling.BICUBIC), np.float32)
    grain = rng.normal(0, 6, (height, width, 3)).astype(np.float32)
    return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))


def make_photos(folder: Path, count: int, seed: int = 0, size=(500, 375)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(count):
        path = folder / f"photo{k:05d}.jpg"
        if not path.exists():
            photo(rng, *size).save(path, quality=90)
        paths.append(path)
    return paths


def photo_count(args) -> int:
    return min(PHOTOS, max(20, max(args.images, args.million) // 50))


def split_counts(images: int, classes: int) -> dict[str, dict[str, int]]:
    """`images` files over train/val/test (80/10/10) and `classes` classes."""
    counts = {}
    for split, share in SPLITS.items():
        per_class = max(1, round(images * share / classes))
        counts[split] = {f"class{c:03d}": per_class for c in range(classes)}
    return counts


def link_tree(root: Path, photos: list[Path], counts: dict) -> Path:
    """`<root>/<split>/<class>/<n>.jpg` as hard links to `photos` (each split its own share
    of them); kept when it exists with the same counts."""
    stamp = root / ".counts.json"
    if stamp.exists() and json.loads(stamp.read_text()) == counts:
        return root
    shutil.rmtree(root, ignore_errors=True)
    start = 0
    for split, share in SPLITS.items():
        own = [str(p) for p in photos[start : start + max(1, round(len(photos) * share))]]
        start += len(own)
        k = 0
        for label, n in counts[split].items():
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                os.link(own[k % len(own)], f"{folder}/{label}.{i:07d}.jpg")
                k += 1
    stamp.write_text(json.dumps(counts))
    return root


def overlay(path: Path, **config) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def data_overlay(path: Path, root: Path, counts: dict) -> Path:
    return overlay(path, data={"root": str(root), "source": None, "expected_counts": counts})


# ---- the figures ---------------------------------------------------------------------------


def snakemake(workdir: Path, *configs: Path, dry_run: bool = True) -> list[str]:
    command = ["snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir)]
    command += ["-n", "--quiet"] if dry_run else ["--cores", "2"]
    return [*command, "--configfile", str(DEMO_CONFIG), *map(str, configs)]


def demo_workdir(work: Path) -> Path:
    """A working directory with the demo data made by the workflow's own rule."""
    workdir = work / "demo"
    if not (workdir / "data" / "demo").is_dir():
        workdir.mkdir(parents=True, exist_ok=True)
        command = snakemake(workdir, dry_run=False)
        measure([*command, "--until", "make_demo_data"], log=work / "make_demo_data.log")
    return workdir


def fresh(work: Path, name: str) -> Path:
    """A new, empty working directory (no .snakemake state from an earlier run)."""
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))


def parse_figures(args, work: Path, timings: dict) -> None:
    """Dry runs: the demo, --images and --million files, the grid; `snakemake --version`."""
    demo = demo_workdir(work)
    photos = make_photos(work / "photos", photo_count(args))
    runs = {}
    for n in (args.images, args.million):
        counts = split_counts(n, args.classes)
        root = link_tree(work / f"tree{n}", photos, counts)
        runs[f"dry {n}"] = data_overlay(work / f"data{n}.yaml", root, counts)
    grid = overlay(work / "grid.yaml", experiments={"sweep": {"grid": GRID}})
    for repeat in range(args.repeats):
        print(f"  dry runs, repeat {repeat + 1} of {args.repeats}", flush=True)
        timings["version"].append(measure(["snakemake", "--version"])[0])
        timings["dry demo"].append(measure(snakemake(demo))[0])
        for name, config in runs.items():
            workdir = fresh(work, "dry")
            timings[name].append(measure(snakemake(workdir, config))[0])
            shutil.rmtree(workdir)
        timings["dry grid"].append(measure(snakemake(demo, grid))[0])


def rule_threads(rule: str, smk: str) -> int:
    """The `threads:` of a rule, read from its .smk file (what the job gets)."""
    text = (REPO / "rules" / smk).read_text()
    block = text[text.index(f"rule {rule}:") :]
    return int(re.search(r"threads:\s*(\d+)", block).group(1))


def verify_command(root: Path, counts: dict, out: Path, threads: int) -> list[str]:
    settings = {"splits": list(SPLITS), "expected_counts": counts}
    return [
        sys.executable,
        str(SCRIPTS / "verify_dataset.py"),
        f"--data-root={root}",
        f"--settings={json.dumps(settings)}",
        f"--threads={threads}",
        f"--manifest={out / 'manifest.tsv'}",
        f"--counts={out / 'counts.tsv'}",
    ]


def verify_figures(args, work: Path, timings: dict, memory: dict) -> None:
    """verify_dataset vs plain decoding, same files, same threads; its peak memory."""
    photos = make_photos(work / "photos", photo_count(args))
    counts = split_counts(args.images, args.classes)
    root = link_tree(work / f"tree{args.images}", photos, counts)
    small_counts = split_counts(args.images // 5, args.classes)
    small = link_tree(work / f"tree{args.images // 5}", photos, small_counts)
    out = work / "verified"
    out.mkdir(exist_ok=True)
    plain = [sys.executable, "-c", PLAIN_DECODING, str(root), str(args.threads), *SPLITS]
    for repeat in range(args.repeats):
        print(f"  verification, repeat {repeat + 1} of {args.repeats}", flush=True)
        seconds, _, _, cpu = measure(plain)
        timings["plain"].append(seconds)
        timings["plain cpu"].append(cpu)
        command = verify_command(root, counts, out, args.threads)
        # (Sampling the memory costs well under 1% of a CPU.)
        peaks = measure(command, log=out / "verify.log", total=True)
        timings["verify"].append(peaks[0])
        timings["verify cpu"].append(peaks[3])
        memory["verify large"].append(peaks)
    command = verify_command(small, small_counts, out, args.threads)
    memory["verify small"].append(measure(command, log=out / "verify_small.log", total=True))


def tiny_tree(work: Path, images: int) -> tuple[Path, Path]:
    """`images` 32 x 32 JPEGs in train/<2 classes> (hard links) and their verified manifest."""
    photos = make_photos(work / "tiny_photos", 200, seed=1, size=(32, 32))
    half = images // 2
    counts = {"train": {"class000": half, "class001": images - half}}
    root = work / f"tiny{images}"
    stamp = root / ".counts.json"
    if not (stamp.exists() and json.loads(stamp.read_text()) == counts):
        shutil.rmtree(root, ignore_errors=True)
        for label, n in counts["train"].items():
            folder = root / "train" / label
            folder.mkdir(parents=True)
            for i in range(n):
                os.link(photos[i % len(photos)], f"{folder}/{i:07d}.jpg")
        stamp.write_text(json.dumps(counts))
    manifest = work / f"tiny{images}.tsv"
    if not manifest.exists():
        settings = {"splits": ["train"], "expected_counts": counts, "duplicates": "ignore"}
        measure(
            [
                sys.executable,
                str(SCRIPTS / "verify_dataset.py"),
                f"--data-root={root}",
                f"--settings={json.dumps(settings)}",
                "--threads=4",
                f"--manifest={manifest}",
                f"--counts={work / 'tiny_counts.tsv'}",
            ],
            log=work / "tiny_verify.log",
        )
    return root, manifest


# A feature file as extract_features writes it, with random features: made in a process of
# its own, so that this one never holds PyTorch or the features (see measure()).
FEATURE_FILE = """
import sys, torch
from transfer_learning.checkpoint import FeatureFile, ModelIdentity, save
path, rows, dim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
identity = ModelIdentity(
    backbone="mobilenet_v2", weights="random", image_size=32, mean=[0.5] * 3,
    std=[0.25] * 3, seed=1, classes=["class000", "class001"],
)
features = torch.randn(rows, dim, generator=torch.Generator().manual_seed(rows))
paths = [f"train/class00{k % 2}/{k:07d}.jpg" for k in range(rows)]
labels, views = torch.arange(rows) % 2, torch.zeros(rows, dtype=torch.int64)
save(FeatureFile(identity, "train", features, labels, views, paths), path)
"""


def feature_file(path: Path, rows: int, dim: int = 1280) -> Path:
    """A feature file of `rows` random rows of `dim` floats (what train_head reads)."""
    code = f"import sys; sys.path.insert(0, {str(SCRIPTS)!r})\n{FEATURE_FILE}"
    measure([sys.executable, "-c", code, str(path), str(rows), str(dim)])
    return path


def memory_rows(args) -> dict[str, tuple[int, int]]:
    """Feature rows of the two runs of each stage whose peaks give memory per 100k rows."""
    return {name: (args.images // 5, args.images) for name in ("extract", "head")}


def memory_figures(args, work: Path, memory: dict) -> None:
    """Peak memory of extract_features and train_head, each at two sizes (memory_rows)."""
    out = work / "memory"
    out.mkdir(exist_ok=True)
    settings = {
        "backbone": "mobilenet_v2", "weights": "random", "image_size": 32,
        "mean": [0.5] * 3, "std": [0.25] * 3, "augmented_views": 0, "seed": 1,
        "batch_size": 256,
    }  # fmt: skip
    head = {"epochs": 1, "lr": 1e-3, "batch_size": 32, "dropout": 0.2, "seed": 1}
    sizes = memory_rows(args)
    for k, size in enumerate(("small", "large")):
        rows = sizes["extract"][k]
        print(f"  memory: extract_features, {rows} images", flush=True)
        root, manifest = tiny_tree(work, rows)
        extract = [
            sys.executable,
            str(SCRIPTS / "extract_features.py"),
            f"--settings={json.dumps(settings)}",
            f"--manifest={manifest}",
            f"--data-root={root}",
            "--split=train",
            "--weights-file=none",
            f"--threads={args.threads}",
            f"--max-workers={args.threads - 1}",
            "--device=cpu",
            f"--output={out / 'extracted.pt'}",
        ]
        log = out / f"extract_{size}.log"
        memory[f"extract {size}"].append(measure(extract, log=log, total=True))
    for k, size in enumerate(("small", "large")):
        rows = sizes["head"][k]
        print(f"  memory: train_head, {rows} feature rows", flush=True)
        train = feature_file(out / "train.pt", rows)
        val = feature_file(out / "val.pt", max(2, rows // 8))
        command = [
            sys.executable,
            str(SCRIPTS / "train_head.py"),
            f"--settings={json.dumps(head)}",
            f"--train-features={train}",
            f"--val-features={val}",
            "--device=cpu",
            f"--output={out / 'head.pt'}",
            f"--history={out / 'history.tsv'}",
        ]
        memory[f"head {size}"].append(measure(command, log=out / f"head_{size}.log", total=True))
        features = (train.stat().st_size + val.stat().st_size) / 2**20
        memory[f"head file {size}"].append((0.0, features, features))


# ---- the table -----------------------------------------------------------------------------


def per_100k(small: float, large: float, rows_small: int, rows_large: int) -> tuple[float, float]:
    """(fixed MiB, MiB per 100k rows) of the line through two peaks."""
    slope = (large - small) / (rows_large - rows_small)
    return small - slope * rows_small, slope * 100_000


def table(args, timings: dict, memory: dict) -> str:
    med = {name: statistics.median(values) for name, values in timings.items() if values}
    # memory: name -> [(seconds, largest process MiB, all processes MiB)], one per run
    largest = {k: statistics.median(v[1] for v in vs) for k, vs in memory.items() if vs}
    total = {k: statistics.median(v[2] for v in vs) for k, vs in memory.items() if vs}
    rows = []

    def row(what, measured, reference, ratio, goal):
        rows.append(f"| {what} | {measured} | {reference} | {ratio} | {goal} |")

    if "dry demo" in med:
        big, million = f"dry {args.images}", f"dry {args.million}"
        row(
            "`snakemake -n`, demo / `snakemake --version`",
            f"{med['dry demo']:.1f} s",
            f"{med['version']:.1f} s",
            f"{med['dry demo'] / med['version']:.2f}x",
            "<= 1.5x",
        )
        row(
            f"`snakemake -n`, {args.images:,} image files / demo",
            f"{med[big]:.1f} s",
            f"{med['dry demo']:.1f} s",
            f"{med[big] / med['dry demo']:.2f}x",
            "<= 2x",
        )
        what = f"`snakemake -n`, {args.million:,} image files"
        row(what, f"{med[million]:.1f} s", "", "", "< 60 s")
        row(
            "`snakemake -n`, 500-experiment grid (25 x 20) on the demo",
            f"{med['dry grid']:.1f} s",
            f"{med['dry demo']:.1f} s (1 experiment)",
            f"{med['dry grid'] / med['dry demo']:.2f}x",
            "< 15 s",
        )
    if "verify" in med:
        n = images_in(split_counts(args.images, args.classes))
        row(
            f"verify_dataset, {n:,} JPEGs 500 x 375, {args.threads} CPUs / plain decoding"
            f" (PIL open + convert, {args.threads} threads)",
            f"{n / med['verify']:.0f} images/s",
            f"{n / med['plain']:.0f} images/s",
            f"{med['plain'] / med['verify']:.2f}",
            ">= 0.8",
        )
        row(
            "the same, CPU time per image (all processes and threads)",
            f"{1000 * med['verify cpu'] / n:.2f} ms",
            f"{1000 * med['plain cpu'] / n:.2f} ms",
            f"{med['plain cpu'] / med['verify cpu']:.2f}",
            "",
        )
    if "verify large" in total:
        n = images_in(split_counts(args.images, args.classes))
        small = images_in(split_counts(args.images // 5, args.classes))
        row(
            f"verify_dataset peak memory, all processes, {n:,} / {small:,} images",
            f"{total['verify large']:.0f} MiB",
            f"{total['verify small']:.0f} MiB",
            f"{total['verify large'] / total['verify small']:.2f}x"
            if total["verify small"]
            else "",
            "bounded",
        )
    if "extract large" in total:
        sizes = memory_rows(args)

        def line(peaks, name, rows):
            small, large = peaks[f"{name} small"], peaks[f"{name} large"]
            fixed, slope = per_100k(small, large, *rows)
            return (
                f"{slope:.0f} MiB per 100k rows + {fixed:.0f} MiB"
                f" ({small:.0f} / {large:.0f} MiB at {rows[0]:,} / {rows[1]:,} rows)"
            )

        for name, what in (("extract", "extract_features"), ("head", "train_head")):
            row(
                f"{what} peak memory (1280 floats per row)",
                f"{line(largest, name, sizes[name])} (its process)",
                f"{line(total, name, sizes[name])} (all processes, sampled)",
                "",
                "",
            )
        files = line(total, "head file", sizes["head"])
        row("feature files read by train_head", files, "", "", "")
    header = "| figure | measured | reference | ratio | goal |\n|---|---|---|---|---|\n"
    return header + "\n".join(rows)


def images_in(counts: dict) -> int:
    return sum(sum(per_class.values()) for per_class in counts.values())


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="benchmark.py scale", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000, help="the large data set")
    parser.add_argument("--million", type=int, default=1_000_000, help="the largest dry run")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=rule_threads("verify_dataset", "data.smk"),
        help="verification and plain decoding threads (default: the rule's)",
    )
    parser.add_argument(
        "--figures", default="parse,verify,memory", help="which: parse, verify, memory"
    )
    parser.add_argument(
        "--work", type=Path, help="keep the trees here for the next run (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    figures = set(args.figures.split(","))
    print(
        f"{os.cpu_count()} CPUs, {args.threads} threads, medians of {args.repeats};"
        f" {args.images:,} and {args.million:,} files",
        flush=True,
    )
    timings: dict[str, list[float]] = {k: [] for k in ("version", "dry demo", "dry grid")}
    timings.update({f"dry {args.images}": [], f"dry {args.million}": []})
    timings.update({"verify": [], "plain": [], "verify cpu": [], "plain cpu": []})
    memory: dict[str, list[float]] = {}
    for name in ("verify", "extract", "head", "head file"):
        memory.update({f"{name} small": [], f"{name} large": []})
    work = args.work or Path(tempfile.mkdtemp(prefix="benchmark-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        if "parse" in figures:
            parse_figures(args, work, timings)
        if "verify" in figures:
            verify_figures(args, work, timings, memory)
        if "memory" in figures:
            memory_figures(args, work, memory)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"({time.perf_counter() - started:.0f} s)\n")
    print(table(args, timings, memory))
