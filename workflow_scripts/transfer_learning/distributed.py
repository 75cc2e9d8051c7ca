"""One training or evaluation spread over several processes: PyTorch's distributed data parallel.

`workflow_scripts/launch.py` starts a stage once per GPU with `torchrun` when its rule asks
for more than one GPU; torchrun tells each process who it is (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE) and where the others are (MASTER_ADDR, MASTER_PORT). Without those
variables `setup` returns `ONE` and every helper here does nothing: one process runs exactly
as it did before this module existed.

- backend: `nccl` on CUDA (device `cuda:<LOCAL_RANK>`), `gloo` on the CPU (tests, laptops)
- rank 0 is the one writer of checkpoints, tables and resume state (`Processes.is_main`);
  `barrier` after writing, so no process runs ahead of a file it may read
- inference (validation, evaluation, feature extraction) shards a split into contiguous runs
  of WHOLE batches (`inference_shard`): every image meets the same batch as in one process,
  so the outputs gathered in rank order (`gather_in_order`) are identical to one process
- training: every process takes its share of every global batch (`batch_share`, used by
  data.EpochSampler), and after each batch one all_reduce (`agree`) gives the global batch's
  size (for the loss weights) and any process's stop signal, so all stop after the same batch
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .errors import UserError

log = logging.getLogger("transfer_learning")


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes of one stage, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def many(self) -> bool:
        """More than one process: collectives run, rank 0 alone writes."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.many:
            dist.barrier()


ONE = Processes()


def pick_device(prefer: str = "auto") -> torch.device:
    """One process's device: CUDA when present (`auto`), or the one named."""
    if prefer == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(prefer)


def _device(prefer: str, local_rank: int, many: bool) -> torch.device:
    if not many:
        return pick_device(prefer)
    if prefer in ("auto", "cuda"):
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if prefer == "cuda":
            raise UserError("--device cuda: no GPU is visible to this process")
        return torch.device("cpu")
    if prefer == "cpu":
        return torch.device("cpu")
    raise UserError(
        f"--device {prefer} names one device, but this stage runs as several processes "
        "(torchrun): use --device auto (each process takes cuda:<LOCAL_RANK>) or cpu"
    )


def setup(prefer_device: str = "auto") -> Processes:
    """This process's `Processes`; joins the process group when torchrun started it.

    Idempotent: a process that already joined (a second stage in one process) reuses it.
    Processes other than rank 0 log warnings and errors only, marked with their rank, so a
    stage's log reads as one process's log.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Processes(device=_device(prefer_device, 0, many=False))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    device = _device(prefer_device, local_rank, many=True)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        atexit.register(_leave)
        if rank == 0:
            log.info(
                "%d processes (%d on this node), backend %s, device of rank 0: %s",
                world_size,
                local_world_size,
                backend,
                device,
            )
        else:
            _quiet(rank)
    return Processes(rank, world_size, local_rank, local_world_size, device)


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class _RankPrefix(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = f"[rank {self.rank}] {record.msg}"
        return True


def _quiet(rank: int) -> None:
    logger = logging.getLogger("transfer_learning")
    logger.setLevel(logging.WARNING)
    logger.addFilter(_RankPrefix(rank))


# ---- training: shares of every global batch, one agreement per batch ---------------------


def batch_share(size: int, rank: int, world_size: int) -> slice:
    """The part of a global batch of `size` items that process `rank` trains on.

    Consecutive parts in rank order, of size // world_size or one more (the first
    size % world_size ranks take one more): 16 over 3 processes is 6, 5, 5.
    """
    base, extra = divmod(size, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def agree(
    processes: Processes, images: int, received: int | None, signals: Sequence[int]
) -> tuple[int, int | None]:
    """After a batch: (images in the global batch, the stop signal any process received).

    One all_reduce of a few integers; in one process, nothing to agree on. When processes
    received different signals, the first of `signals` wins (SIGTERM before SIGUSR1).
    """
    if not processes.many:
        return images, received
    counts = [images, *(int(received == signum) for signum in signals)]
    agreed = torch.tensor(counts, dtype=torch.int64, device=processes.device)
    dist.all_reduce(agreed)
    total, *seen = agreed.tolist()
    return total, next((signum for signum, n in zip(signals, seen, strict=True) if n), None)


def sum_across(processes: Processes, values: Sequence[float]) -> list[float]:
    """Each value summed over the processes (an epoch's loss sums and counts)."""
    if not processes.many:
        return list(values)
    summed = torch.tensor(values, dtype=torch.float64, device=processes.device)
    dist.all_reduce(summed)
    return summed.tolist()


def data_parallel(model: nn.Module, processes: Processes) -> nn.Module:
    """The model wrapped in DistributedDataParallel (gradients averaged over processes);
    the model itself in one process."""
    if not processes.many:
        return model
    device_ids = [processes.device.index] if processes.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def sync_batchnorm(
    model: nn.Module, frozen: Sequence[nn.Module], processes: Processes
) -> nn.Module:
    """BatchNorm layers that train normalise over the global batch, as in one process.

    SyncBatchNorm on CUDA. PyTorch's SyncBatchNorm runs on GPUs only: with gloo on the CPU
    each process normalises over its own share (the log says so), and such a run differs
    from one process by more than rounding. Frozen layers (eval mode) need nothing.
    """
    if not processes.many:
        return model
    kept = {id(module) for block in frozen for module in block.modules()}
    training = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in kept
    ]
    if not training:
        return model
    if processes.device.type != "cuda":
        log.warning(
            "%d BatchNorm layers train and SyncBatchNorm needs CUDA: on the CPU each of the "
            "%d processes normalises over its own share of the batch",
            len(training),
            processes.world_size,
        )
        return model
    # Containers keep their identity (only the BatchNorm leaves are replaced), so `frozen`
    # still names the blocks to keep in eval mode.
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def seed_offset(processes: Processes) -> int:
    """Added to a process's per-epoch seed: dropout masks come from one stream per process
    (rank 0's is the one-process stream), so N processes draw other masks than one."""
    return processes.rank * 2**40


# ---- inference: shards of whole batches, gathered in order -------------------------------


def inference_shard(n: int, batch_size: int, processes: Processes) -> range:
    """The items this process predicts: a contiguous run of whole batches.

    Every item meets the same batch (same neighbours, same batch size) as in one process,
    so its outputs are bit for bit the same; rank order is the original order. With fewer
    batches than processes the last processes get none.
    """
    if not processes.many:
        return range(n)
    batches = -(-n // batch_size)
    part = batch_share(batches, processes.rank, processes.world_size)
    return range(min(n, part.start * batch_size), min(n, part.stop * batch_size))


def gather_in_order(
    tensor: torch.Tensor, processes: Processes, *, to_all: bool = True
) -> torch.Tensor | None:
    """Every process's rows, concatenated in rank order, on the CPU.

    With `inference_shard` that is the original order. `to_all=False` gathers on rank 0 only
    (the others get None), part by part into the one output tensor: the features of a large
    split are held once, plus one part in transit. A process with no rows may pass an empty
    tensor of any shape.
    """
    if not processes.many:
        return tensor
    # Shapes first: every process learns each part's rows and the row shape and type.
    shapes = [None] * processes.world_size
    dist.all_gather_object(shapes, (tuple(tensor.shape), tensor.dtype) if tensor.numel() else None)
    known = [s for s in shapes if s is not None]
    if not known:
        return tensor if to_all or processes.is_main else None
    (_, *row_shape), dtype = known[0]
    rows = [s[0][0] if s is not None else 0 for s in shapes]
    if not to_all:
        return _gather_on_main(tensor, processes, rows, row_shape, dtype)
    # Padded to the longest part, one all_gather carries every part (validation: small).
    padded = torch.zeros((max(rows), *row_shape), dtype=dtype, device=processes.device)
    if tensor.numel():
        padded[: len(tensor)] = tensor.to(processes.device)
    parts = [torch.empty_like(padded) for _ in rows]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, rows, strict=True)]).cpu()


def _gather_on_main(tensor, processes: Processes, rows, row_shape, dtype) -> torch.Tensor | None:
    """Each process sends its rows to rank 0, which receives them in rank order into place."""
    device = processes.device
    if not processes.is_main:
        if rows[processes.rank]:
            dist.send(tensor.to(device).contiguous(), dst=0)
        return None
    out = torch.empty((sum(rows), *row_shape), dtype=dtype)
    start = 0
    for rank, n in enumerate(rows):
        if rank == 0 and n:
            out[:n] = tensor
        elif n and device.type == "cpu":
            dist.recv(out[start : start + n], src=rank)
        elif n:  # nccl moves GPU memory: one part at a time through the GPU
            part = torch.empty((n, *row_shape), dtype=dtype, device=device)
            dist.recv(part, src=rank)
            out[start : start + n] = part.cpu()
        start += n
    return out
