"""What a GPU stage used: the figures that size the next Slurm request.

Slurm's own accounting (`sacct`, `--slurm-efficiency-report`) knows CPU time and memory but
nothing of the GPU, so each stage measures every pass over its images itself: the device,
images per second, the share of the pass spent waiting for the data loader (high: ask for
more CPUs or fewer images per second will not come from a bigger GPU), and peak GPU memory
(low: a smaller GPU or a larger batch fits). One row per pass, written beside the outputs.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import torch

from .io import write_tsv

USAGE_COLUMNS = [
    "stage",
    "pass",
    "epoch",
    "device",
    "images",
    "seconds",
    "images_per_s",
    "loader_wait_fraction",
    "peak_gpu_mb",
]


def device_name(device: torch.device) -> str:
    """The GPU's model (e.g. 'Tesla V100-SXM2-32GB'), or the CPU with its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads, {os.cpu_count()} cores on the node)"


@dataclass
class PassUsage:
    stage: str
    pass_: str
    epoch: int | str
    device: str
    images: int
    seconds: float
    images_per_s: float
    loader_wait_fraction: float
    peak_gpu_mb: float | str

    def row(self) -> dict:
        values = asdict(self)
        values["pass"] = values.pop("pass_")
        return values


class UsageLog:
    """Measures passes over loaders of one stage on one device; `rows` for the TSV."""

    def __init__(self, stage: str, device: torch.device, rows: Iterable[dict] = ()):
        self.stage = stage
        self.device = device
        self.name = device_name(device)
        # Rows of an earlier job of the same training (resumed), possibly on another GPU.
        self.rows: list[dict] = list(rows)

    def measure(self, loader: Iterable, pass_name: str, epoch: int | str = "") -> Iterator:
        """Yield the loader's batches, timing the waits for each; one row when exhausted."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        images, waited = 0, 0.0
        started = time.perf_counter()
        batches = iter(loader)
        while True:
            before = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                break
            waited += time.perf_counter() - before
            images += len(batch[-1])
            yield batch
        if cuda:
            # Kernels run asynchronously: the pass ends when the GPU is done with it.
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if cuda else ""
        self.rows.append(
            PassUsage(
                stage=self.stage,
                pass_=pass_name,
                epoch=epoch,
                device=self.name,
                images=images,
                seconds=round(seconds, 3),
                images_per_s=round(images / max(seconds, 1e-9), 1),
                loader_wait_fraction=round(waited / max(seconds, 1e-9), 3),
                peak_gpu_mb=round(peak, 1) if cuda else peak,
            ).row()
        )

    def write(self, path: str) -> None:
        write_tsv(path, self.rows, USAGE_COLUMNS)


def summary(rows: list[dict]) -> dict:
    """Per stage figures for the summary table: device, training images/s (median over
    epochs), the largest loader-wait share and peak GPU memory, and the summed wall time."""
    if not rows:
        return {}
    train = [r for r in rows if r["pass"] == "train"] or rows
    peaks = [float(r["peak_gpu_mb"]) for r in rows if r["peak_gpu_mb"] not in ("", None)]
    return {
        "device": rows[-1]["device"],
        "images_per_s": round(statistics.median(float(r["images_per_s"]) for r in train), 1),
        "loader_wait_fraction": max(float(r["loader_wait_fraction"]) for r in rows),
        "peak_gpu_mb": max(peaks) if peaks else "",
        "gpu_stage_seconds": round(sum(float(r["seconds"]) for r in rows), 1),
    }
