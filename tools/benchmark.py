#!/usr/bin/env python3
"""Speed figures of the workflow's design choices, measured in one run on one machine.

  1. Head training on cached features vs the course's way (frozen backbone over every
     image in every epoch), same epochs, same data: times and their ratio.
  2. Feature-extraction throughput (images/s): our extractor (eval mode, inference_mode,
     channels_last) vs a plain torchvision ImageFolder + DataLoader + no_grad loop.
  3. End-to-end wall time of the demo workflow (`snakemake --configfile config/demo.yaml`).

Machines are noisy: every figure is the median of --repeats runs. Usage:
  python tools/benchmark.py [--images-per-class 100] [--image-size 224] [--epochs 5]
  python tools/benchmark.py scale [--images 100000] ...   # at scale: benchmark_scale.py
  python tools/benchmark.py ddp [--processes 1 2]          # data parallel: torchrun, gloo
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow_scripts"))

if __name__ == "__main__" and sys.argv[1:2] == ["scale"]:
    # Before PyTorch is imported: the scale figures take each program's peak memory from
    # getrusage, which counts the parent's resident memory at the moment of the fork.
    import benchmark_scale  # tools/, next to this file

    benchmark_scale.main(sys.argv[2:])
    sys.exit(0)

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402
from transfer_learning import data, demo, models, stages, verify  # noqa: E402
from transfer_learning.io import write_tsv  # noqa: E402
from transfer_learning.train import EarlyStopping, fit, pick_device  # noqa: E402
from transfer_learning.verify import MANIFEST_COLUMNS  # noqa: E402


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_data(root: Path, per_class: int, size: int) -> Path:
    counts = {"train": {"cats": per_class, "dogs": per_class}}
    counts["val"] = {"cats": max(2, per_class // 5), "dogs": max(2, per_class // 5)}
    demo.make_demo_dataset(root, counts, size, seed=1)
    report = verify.verify_dataset(root, ["train", "val"])
    manifest = root.parent / "manifest.tsv"
    write_tsv(manifest, report.manifest, MANIFEST_COLUMNS)
    return manifest


def course_head_training(model, dataset, epochs, batch_size, device, workers):
    """The notebook's way: images through the frozen backbone in every epoch."""
    head = models.Head(models.feature_dim(model), 2).to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for epoch in range(epochs):
        loader = data.make_loader(dataset, batch_size, shuffle=True, epoch=epoch, workers=workers)
        for images, labels in loader:
            with torch.no_grad():
                feats = model(images.to(device))
            loss = loss_fn(head(feats).squeeze(1), labels.float().to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def cached_head_training(features, labels, val, epochs, batch_size, device):
    head = models.Head(features.shape[1], 2).to(device)
    head.fit_standardisation(features)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-4)
    scheduler = stages.warmup_then_constant(optimizer, 0, 1.0)
    train_set = TensorDataset(features, labels)
    fit(
        head,
        lambda e: data.make_loader(train_set, batch_size, shuffle=True, epoch=e),
        data.make_loader(TensorDataset(*val), 1024),
        optimizer,
        scheduler,
        num_classes=2,
        epochs=epochs,
        seed=0,
        device=device,
        early_stopping=EarlyStopping(),
        stage="bench_head",
    )


def plain_extraction(root: Path, size: int, batch_size: int, device, workers: int):
    """What a notebook does: ImageFolder, default memory format, no_grad."""
    transform = data.eval_transform(size, models.IMAGENET_MEAN, models.IMAGENET_STD)
    folder = torchvision.datasets.ImageFolder(root / "train", transform=transform)
    model = models.build_backbone("mobilenet_v2").to(device).eval()
    loader = torch.utils.data.DataLoader(folder, batch_size=batch_size, num_workers=workers)
    with torch.no_grad():
        for images, _ in loader:
            model(images.to(device))
    return len(folder)


def forward_throughput(size: int, device, repeats: int) -> tuple[float, float]:
    """Images/s of the backbone alone on decoded batches: plain vs our inference setup."""
    model = models.build_backbone("mobilenet_v2").to(device).eval()
    batch = torch.randn(32, 3, size, size, device=device)

    def plain():
        with torch.no_grad():
            model(batch)

    fast_model = model.to(memory_format=torch.channels_last)
    fast_batch = batch.contiguous(memory_format=torch.channels_last)

    def ours():
        with torch.inference_mode():
            fast_model(fast_batch)

    plain()  # warm-up: first calls pick kernels
    ours()
    return 32 / median_time(plain, repeats), 32 / median_time(ours, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-class", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=min(4, (os.cpu_count() or 2) - 1))
    parser.add_argument("--skip-demo", action="store_true")
    args = parser.parse_args()
    device = pick_device()
    print(
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.workers} loader workers, {2 * args.images_per_class} train images "
        f"at {args.image_size}px, {args.epochs} epochs, median of {args.repeats}"
    )

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        manifest = make_data(root, args.images_per_class, args.image_size)
        # A local weights file, as on the cluster after fetch_weights (no BatchNorm
        # calibration, which only random-init backbones need).
        weights_file = Path(tmp) / "mobilenet_v2-local.pth"
        torch.save(torchvision.models.mobilenet_v2().state_dict(), weights_file)
        common = dict(
            manifest=str(manifest),
            data_root=str(root),
            backbone="mobilenet_v2",
            weights=None,
            weights_file=None,
            image_size=args.image_size,
            mean=models.IMAGENET_MEAN,
            std=models.IMAGENET_STD,
            batch_size=64,
            workers=args.workers,
        )
        n_train = 2 * args.images_per_class
        out = Path(tmp) / "features"

        # 2. extraction throughput
        ours = median_time(
            lambda: stages.extract_features(split="train", output=str(out / "train.pt"), **common),
            args.repeats,
        )
        plain = median_time(
            lambda: plain_extraction(root, args.image_size, 64, device, args.workers), args.repeats
        )
        print(
            f"extraction: ours {n_train / ours:.1f} images/s, plain ImageFolder loop "
            f"{n_train / plain:.1f} images/s, ratio {plain / ours:.2f}x"
        )

        plain_fwd, ours_fwd = forward_throughput(args.image_size, device, args.repeats)
        print(
            f"backbone forward alone: ours (inference_mode, channels_last) {ours_fwd:.1f} "
            f"images/s, plain (no_grad) {plain_fwd:.1f} images/s, ratio {ours_fwd / plain_fwd:.2f}x"
        )

        # 1. head training: cached features vs backbone every epoch
        stages.extract_features(split="val", output=str(out / "val.pt"), **common)
        train = torch.load(out / "train.pt", weights_only=True)
        val = torch.load(out / "val.pt", weights_only=True)
        records = data.split_records(data.read_manifest(manifest), "train")
        dataset = data.ImageDataset(
            root,
            records,
            ["cats", "dogs"],
            args.image_size,
            models.IMAGENET_MEAN,
            models.IMAGENET_STD,
        )
        backbone = stages.build_model_for_features("mobilenet_v2", weights_file, 0, device, dataset)
        course = median_time(
            lambda: course_head_training(
                backbone, dataset, args.epochs, args.batch_size, device, args.workers
            ),
            args.repeats,
        )
        cached = median_time(
            lambda: cached_head_training(
                train["features"],
                train["labels"],
                (val["features"], val["labels"]),
                args.epochs,
                args.batch_size,
                device,
            ),
            args.repeats,
        )
        print(
            f"head training, {args.epochs} epochs: course's way {course:.2f} s, cached "
            f"features {cached:.3f} s, ratio {course / cached:.0f}x "
            f"(with the one-off extraction: {course / (cached + ours):.1f}x)"
        )

    # 3. end-to-end demo
    if not args.skip_demo:
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
            start = time.perf_counter()
            subprocess.run(
                [
                    "snakemake",
                    "-s",
                    str(REPO / "Snakefile"),
                    "-d",
                    tmp,
                    "--configfile",
                    str(REPO / "config" / "demo.yaml"),
                    "--cores",
                    "2",
                    "--quiet",
                ],
                check=True,
                env=env,
                stdout=subprocess.DEVNULL,
            )
            print(f"demo workflow end to end: {time.perf_counter() - start:.0f} s wall")


def ddp_benchmark(argv: list[str]) -> None:
    """`benchmark.py ddp`: fine-tuning images/s of 1 and N processes (torchrun, gloo, CPU).

    Each run is `torchrun --standalone --nproc-per-node N benchmark.py ddp --worker`: the
    training loop (train.train_one_epoch) on the model wrapped in DistributedDataParallel,
    each process on its share of every global batch of random images (no decoding, so the
    figure is compute plus communication). Images/s: the global images of an epoch over
    its wall time, median over the epochs after the first.
    """
    parser = argparse.ArgumentParser(prog="benchmark.py ddp", description=ddp_benchmark.__doc__)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or auto (GPUs: nccl)")
    parser.add_argument(
        "--threads", type=int, help="per process (default: torchrun's, 1 for several)"
    )
    parser.add_argument("--worker", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _ddp_worker(args)
    figures = {}
    for n in args.processes:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "figures.json"
            command = [
                sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={n}", __file__, "ddp", "--worker", str(out),
                *argv,
            ]  # fmt: skip
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            figures[n] = json.loads(out.read_text())
        print(
            f"ddp {n} process(es), backend {figures[n]['backend']}, "
            f"{figures[n]['threads']} thread(s) each: {figures[n]['images_per_s']:.1f} images/s "
            f"(epochs: {', '.join(f'{x:.1f}' for x in figures[n]['epochs'])})"
        )
    if 1 in figures:
        for n in figures:
            if n > 1:
                ratio = figures[n]["images_per_s"] / figures[1]["images_per_s"]
                print(f"ddp speed-up of {n} processes over 1: {ratio:.2f}x")


def _ddp_worker(args) -> None:
    from transfer_learning import distributed, train

    processes = distributed.setup(args.device)
    device = processes.device
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=1)
    model = model.to(device).to(memory_format=torch.channels_last)
    network = distributed.data_parallel(model, processes)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(args.images, 3, args.image_size, args.image_size, generator=generator)
    labels = torch.randint(0, 2, (args.images,), generator=generator)
    loader = data.make_loader(
        TensorDataset(images, labels), args.batch_size, shuffle=True,
        rank=processes.rank, world_size=processes.world_size,
    )  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    epochs = []
    for epoch in range(args.epochs):
        loader.sampler.set_epoch(epoch)
        processes.barrier()
        start = time.perf_counter()
        train.train_one_epoch(network, loader, optimizer, loss_fn, 2, device, processes=processes)
        processes.barrier()
        epochs.append(args.images / (time.perf_counter() - start))
    if processes.is_main:
        figures = {
            "backend": (
                ("nccl" if device.type == "cuda" else "gloo") if processes.many else "none"
            ),
            "threads": torch.get_num_threads(),
            "images_per_s": statistics.median(epochs[1:] or epochs),
            "epochs": epochs,
        }
        Path(args.worker).write_text(json.dumps(figures))


if __name__ == "__main__":
    if sys.argv[1:2] == ["ddp"]:
        ddp_benchmark(sys.argv[2:])
    else:
        main()
