"""The one training loop that both the head and the fine-tuning stage run.

Every epoch ends with a resume checkpoint written atomically; randomness is reseeded from
(seed, epoch) at the start of each epoch, so a run resumed after a Slurm time limit or a
preemption ends with the same history and weights as one that never stopped (on CPU).

The same loop runs as several processes under torchrun (distributed.py): the model is
wrapped in DistributedDataParallel, each process trains on its share of every global batch,
validation is sharded and gathered, and rank 0 alone writes the resume state.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import checkpoint, distributed, models
from .distributed import ONE, Processes
from .errors import TrainingInterrupted, UserError
from .io import write_tsv
from .usage import UsageLog

log = logging.getLogger("transfer_learning")

HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]


class StopSignals:
    """Turns SIGTERM/SIGUSR1 into a flag that the loop checks between batches."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        log.warning("received %s: stopping after this batch", signal.Signals(signum).name)
        self.received = signum

    def check(self, processes: Processes = ONE) -> None:
        """Raise TrainingInterrupted when this process, or any other, received a signal."""
        _, signum = distributed.agree(processes, 0, self.received, self.SIGNALS)
        if signum is not None:
            raise TrainingInterrupted(signum)


@dataclass
class EarlyStopping:
    """Stop when the monitored validation figure has not improved by min_delta for
    `patience` epochs. `monitor` is val_loss (lower is better) or val_accuracy (higher)."""

    patience: int | None = None
    min_delta: float = 0.0
    monitor: str = "val_loss"
    best: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0

    def improves(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.monitor == "val_accuracy":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def step(self, value: float, epoch: int) -> bool:
        """Record an epoch's monitored value; True when it is the new best."""
        if self.improves(value):
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.bad_epochs = (
            state["best"],
            state["best_epoch"],
            state["bad_epochs"],
        )


class EpochObserver:
    """Follows a training from outside (TensorBoard, MLflow) without changing it.

    `on_start` gets the epochs already run (a resumed training's history), so an observer
    can add what it missed when the last job stopped between saving an epoch and reporting
    it; `on_epoch` comes after the epoch is saved for resuming, so it is never reported twice
    by a run that continues.
    """

    def on_start(self, history: list[dict]) -> None:
        pass

    def on_epoch(self, row: dict) -> None:
        pass

    def on_end(self, result: FitResult) -> None:
        pass


@dataclass
class FitResult:
    history: list[dict]
    best_state: dict
    best_epoch: int  # the epoch whose weights best_state holds
    best_val_loss: float  # that epoch's validation loss
    seconds: float
    resumed_from: int = 0
    stopped_early: bool = False
    kept: str = ""  # which epoch was kept and why, for the checkpoint and the summary


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed torch and ask for deterministic kernels.

    On CPU this makes runs repeatable bit for bit. On CUDA, cuDNN's autotuner stays off when
    deterministic; some backward kernels (atomics) still vary in the last bits, see README.
    """
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        # cuBLAS needs a fixed workspace for repeatable results; set before CUDA starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # warn_only: kernels without a deterministic version (some index_add/scatter
    # backward passes on CUDA) warn in the log instead of stopping the run.
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def warmup_then_constant(optimizer, warmup_epochs: int, start_factor: float):
    """Linear warm-up from start_factor x lr over warmup_epochs, then constant lr."""

    def factor(epoch: int) -> float:
        if warmup_epochs <= 0 or epoch >= warmup_epochs:
            return 1.0
        return start_factor + (1.0 - start_factor) * epoch / warmup_epochs

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def write_history(path: str, history: list[dict]) -> None:
    write_tsv(path, history, HISTORY_COLUMNS)


def pick_device(prefer: str = "auto") -> torch.device:
    """One process's device (distributed.setup picks each process's under torchrun)."""
    return distributed.pick_device(prefer)


def _to_device(inputs: torch.Tensor, device: torch.device) -> torch.Tensor:
    inputs = inputs.to(device, non_blocking=True)
    if inputs.dim() == 4:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    return inputs


def correct_predictions(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> int:
    if num_classes == 2:
        predicted = (logits.squeeze(1) > 0).long()
    else:
        predicted = logits.argmax(1)
    return int((predicted == labels).sum())


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    num_classes: int,
    device: torch.device,
    *,
    frozen: Sequence[nn.Module] = (),
    scaler: torch.amp.GradScaler | None = None,
    amp: bool = False,
    stop: StopSignals | None = None,
    usage: UsageLog | None = None,
    epoch: int | str = "",
    processes: Processes = ONE,
) -> tuple[float, float]:
    """One pass over the loader; the epoch's mean loss and accuracy over every process.

    With several processes `model` is the DistributedDataParallel wrapper, which averages the
    gradients of the processes. Each process's mean loss is weighed by its share of the
    global batch first (n x processes / images), so the gradient is the global batch's
    mean even when the shares differ by an image.
    """
    models.train_mode(model, frozen)
    total_loss, correct, seen = 0.0, 0, 0
    batches = usage.measure(loader, "train", epoch) if usage else loader
    for inputs, labels in batches:
        inputs, labels = _to_device(inputs, device), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            logits = model(inputs)
            loss = loss_fn(
                models.logits_for_loss(logits, num_classes).float(),
                models.loss_targets(labels, num_classes),
            )
        n = labels.shape[0]
        # One all_reduce per batch (none in one process): the global batch's size, and the
        # stop signal of any process, so that every process stops after this same batch.
        images, signum = distributed.agree(
            processes, n, stop.received if stop is not None else None, StopSignals.SIGNALS
        )
        weighted = loss * (n * processes.world_size / images) if processes.many else loss
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(weighted).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            weighted.backward()
            optimizer.step()
        total_loss += float(loss.detach()) * n
        correct += correct_predictions(logits.detach(), labels, num_classes)
        seen += n
        if signum is not None:
            raise TrainingInterrupted(signum)
    total_loss, correct, seen = distributed.sum_across(processes, [total_loss, correct, seen])
    return total_loss / seen, correct / seen


@torch.inference_mode()
def predict(
    model: nn.Module,
    loader,
    device: torch.device,
    *,
    amp: bool = False,
    usage: UsageLog | None = None,
    pass_name: str = "predict",
    epoch: int | str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of a whole loader, in loader order, on the CPU."""
    model.eval()
    all_logits, all_labels = [], []
    batches = usage.measure(loader, pass_name, epoch) if usage else loader
    for inputs, labels in batches:
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            logits = model(_to_device(inputs, device))
        all_logits.append(logits.float().cpu())
        all_labels.append(labels)
    if not all_logits:  # a process whose shard of a small split is empty
        return torch.empty(0), torch.empty(0, dtype=torch.int64)
    return torch.cat(all_logits), torch.cat(all_labels)


def validate(
    model: nn.Module,
    loader,
    loss_fn: nn.Module,
    num_classes: int,
    device,
    *,
    amp=False,
    usage: UsageLog | None = None,
    epoch: int | str = "",
    processes: Processes = ONE,
) -> tuple[float, float]:
    """Loss and accuracy of the whole split; with several processes `loader` holds this
    process's shard (distributed.inference_shard) and every process gets the same figures."""
    logits, labels = predict(
        model, loader, device, amp=amp, usage=usage, pass_name="validate", epoch=epoch
    )
    logits = distributed.gather_in_order(logits, processes)
    labels = distributed.gather_in_order(labels, processes)
    loss = loss_fn(
        models.logits_for_loss(logits, num_classes), models.loss_targets(labels, num_classes)
    )
    return float(loss), correct_predictions(logits, labels, num_classes) / len(labels)


def _resume_state(path, key: str, stage: str) -> checkpoint.ResumeState | None:
    """The saved state to continue from, or None (no file, or one made for another run)."""
    if path is None or not Path(path).is_file():
        return None
    try:
        state = checkpoint.load_resume(path)
    except UserError as error:
        log.info("%s: ignoring %s: %s", stage, path, error)
        return None
    if state.key != key:
        log.info(
            "%s: ignoring %s, written for other settings or other inputs (key %s, now %s)",
            stage,
            path,
            state.key,
            key,
        )
        return None
    return state


def fit(
    model: nn.Module,
    train_loader_for: Callable[[int], object],
    val_loader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    *,
    num_classes: int,
    epochs: int,
    seed: int,
    device: torch.device,
    early_stopping: EarlyStopping,
    resume_path: str | Path | None = None,
    resume_key: str = "",
    frozen: Sequence[nn.Module] = (),
    amp: bool = False,
    stage: str = "train",
    restore_best: bool = True,
    usage: UsageLog | None = None,
    observers: Sequence[EpochObserver] = (),
    processes: Processes = ONE,
) -> FitResult:
    """Train for up to `epochs`, keep the weights of the lowest val loss, resume if saved.

    `train_loader_for(epoch)` returns that epoch's loader (its order and augmentation depend
    on the epoch alone). The resume file holds model, optimizer, scheduler, grad scaler,
    early-stopping state, best weights and history; it is only used when its key equals
    `resume_key` (settings and the content of every input, `checkpoint.resume_key`), so a
    changed config or changed data never continue a stale run.
    `usage` measures every pass (kept across resumes); `observers` follow the epochs.

    Several `processes` (torchrun): every process loads the resume state, trains the model
    wrapped in DistributedDataParallel on its share of each batch (`train_loader_for` gives
    the shares) and validates its shard of `val_loader`; rank 0 alone writes the resume state
    and runs the observers, and the others wait for the file (barrier).
    """
    loss_fn = models.loss_function(num_classes)
    amp = amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    history: list[dict] = []
    best_state = copy.deepcopy(model.state_dict())
    start_epoch, elapsed = 1, 0.0

    state = _resume_state(resume_path, resume_key, stage)
    if state is not None:
        model.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        scaler.load_state_dict(state.scaler)
        early_stopping.load_state_dict(state.early_stopping)
        best_state, history = state.best_model, state.history
        start_epoch, elapsed = state.epoch + 1, state.seconds
        if usage is not None:
            usage.rows[:0] = state.usage
        log.info("%s: resuming after epoch %d from %s", stage, state.epoch, resume_path)
    resumed_from = start_epoch - 1
    observers = observers if processes.is_main else ()
    for observer in observers:
        observer.on_start(list(history))
    # Gradients averaged over the processes; the model itself in one process. Validation
    # and saving use `model`: the same parameters, without the wrapper.
    network = distributed.data_parallel(model, processes)

    stopped_early = early_stopping.should_stop
    with StopSignals() as stop:
        for epoch in range(start_epoch, epochs + 1):
            if stopped_early:
                break
            started = time.perf_counter()
            # Reseeding per epoch makes dropout and shuffling a function of the epoch alone
            # (and of the process: each draws its own dropout masks).
            torch.manual_seed(seed * 1_000 + epoch + distributed.seed_offset(processes))
            lr = optimizer.param_groups[0]["lr"]
            train_loss, train_acc = train_one_epoch(
                network,
                train_loader_for(epoch),
                optimizer,
                loss_fn,
                num_classes,
                device,
                frozen=frozen,
                scaler=scaler,
                amp=amp,
                stop=stop,
                usage=usage,
                epoch=epoch,
                processes=processes,
            )
            stop.check(processes)
            val_loss, val_acc = validate(
                model,
                val_loader,
                loss_fn,
                num_classes,
                device,
                amp=amp,
                usage=usage,
                epoch=epoch,
                processes=processes,
            )
            scheduler.step()
            seconds = time.perf_counter() - started
            elapsed += seconds
            monitored = val_acc if early_stopping.monitor == "val_accuracy" else val_loss
            improved = early_stopping.step(monitored, epoch)
            if improved:
                best_state = copy.deepcopy(model.state_dict())
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "train_acc": train_acc,
                    "val_loss": val_loss,
                    "val_acc": val_acc,
                    "lr": lr,
                    "seconds": round(seconds, 3),
                }
            )
            log.info(
                "%s epoch %d/%d train_loss %.4f train_acc %.4f val_loss %.4f val_acc %.4f "
                "lr %.3g %.1fs%s",
                stage,
                epoch,
                epochs,
                train_loss,
                train_acc,
                val_loss,
                val_acc,
                lr,
                seconds,
                " best" if improved else "",
            )
            stopped_early = early_stopping.should_stop
            if resume_path is not None and processes.is_main:
                checkpoint.save(
                    checkpoint.ResumeState(
                        key=resume_key,
                        epoch=epoch,
                        seconds=elapsed,
                        model=model.state_dict(),
                        optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(),
                        scaler=scaler.state_dict(),
                        early_stopping=early_stopping.state_dict(),
                        best_model=best_state,
                        history=history,
                        usage=usage.rows if usage is not None else [],
                    ),
                    resume_path,
                )
            if resume_path is not None:
                processes.barrier()  # the file is complete before any process goes on
            for observer in observers:
                observer.on_epoch(history[-1])
            if stopped_early:
                log.info(
                    "%s: early stop after epoch %d, best epoch %d (%s %.4f)",
                    stage,
                    epoch,
                    early_stopping.best_epoch,
                    early_stopping.monitor,
                    early_stopping.best,
                )
    kept_epoch = early_stopping.best_epoch if restore_best else len(history)
    if not restore_best:
        best_state = copy.deepcopy(model.state_dict())
    kept = _why_kept(early_stopping, kept_epoch, len(history), epochs, stopped_early, restore_best)
    log.info("%s: kept %s", stage, kept)
    result = FitResult(
        history=history,
        best_state=best_state,
        best_epoch=kept_epoch,
        best_val_loss=history[kept_epoch - 1]["val_loss"] if history else math.inf,
        seconds=elapsed,
        resumed_from=resumed_from,
        stopped_early=stopped_early,
        kept=kept,
    )
    for observer in observers:
        observer.on_end(result)
    return result


def _why_kept(early_stopping, kept_epoch, ran, epochs, stopped_early, restore_best) -> str:
    """One line for the summary: which epoch's weights were kept, and why."""
    if not restore_best:
        reason = "the last epoch (restore_best: false)"
    else:
        word = "highest" if early_stopping.monitor == "val_accuracy" else "lowest"
        reason = f"{word} {early_stopping.monitor} {early_stopping.best:.4g}"
    if stopped_early:
        ending = f"early stop after {early_stopping.patience} epochs without improvement"
    else:
        ending = f"all {epochs} epochs run"
    return f"epoch {kept_epoch} of {ran}: {reason}; {ending}"
