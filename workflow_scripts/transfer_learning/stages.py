"""The workflow's stages as functions: extract_features, train_head, finetune, evaluate.

Each takes its settings record (`settings.py`) and plain paths, so it runs the same from its
command-line entry point, from a test, or from a notebook on an interactive node.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from . import checkpoint, data, distributed, metrics, models
from .checkpoint import FeatureFile, ModelIdentity, StageCheckpoint
from .errors import UserError
from .io import write_tsv
from .settings import EvaluateSettings, FeatureSettings, FinetuneSettings, HeadSettings
from .train import (
    EarlyStopping,
    EpochObserver,
    fit,
    pick_device,
    predict,
    seed_everything,
    warmup_then_constant,
    write_history,
)
from .usage import UsageLog

log = logging.getLogger("transfer_learning")

CALIBRATION_IMAGES = 256


def _pin(device: torch.device) -> bool:
    return device.type == "cuda"


def build_model_for_features(
    backbone: str, weights_file, seed: int, device, calibration: data.ImageDataset
):
    """The frozen backbone; a random one gets BatchNorm statistics from training images.

    Calibration uses the first images of the training split in manifest order, so every
    split's extraction job builds the very same network.
    """
    # Random initialisation draws from the global generator: seed it so features repeat.
    torch.manual_seed(seed)
    model = models.build_backbone(backbone, weights_file).to(device)
    model = model.to(memory_format=torch.channels_last)
    if weights_file is None:
        n = min(CALIBRATION_IMAGES, len(calibration))
        loader = data.make_loader(
            torch.utils.data.Subset(calibration, range(n)), 32, drop_lone_last=True
        )
        models.calibrate_batchnorm(
            model,
            (x.to(device).contiguous(memory_format=torch.channels_last) for x, _ in loader),
        )
    return model.eval()


def extract_features(
    settings: FeatureSettings,
    *,
    manifest: str,
    data_root: str,
    split: str,
    output: str,
    weights_file: str | None = None,
    train_split: str = "train",
    workers: int = 0,
    device: str = "auto",
    usage_out: str | None = None,
) -> FeatureFile | None:
    """Run the frozen backbone over one split once; save features, labels and identity.

    Only the training split gets the augmented views; validation and test stay plain.
    Started by torchrun as several processes, each runs a shard of whole batches; rank 0
    gathers the features in order, writes the same file as one process and returns it (the
    others return None). Every process calibrates a random backbone on the same images, so
    all hold the same network without a broadcast.
    """
    processes = distributed.setup(device)
    dev = processes.device
    usage = UsageLog(f"extract_features {split}", dev)
    records = data.read_manifest(manifest)
    classes = data.class_names(records)
    rows = data.split_records(records, split)
    views = 1 + (settings.augmented_views if split == train_split else 0)
    common = dict(image_size=settings.image_size, mean=settings.mean, std=settings.std)
    dataset = data.ImageDataset(
        data_root,
        rows,
        classes,
        views=views,
        seed=settings.seed,
        augment=settings.augment,
        **common,
    )
    calibration = data.ImageDataset(
        data_root, data.split_records(records, train_split), classes, **common
    )
    model = build_model_for_features(
        settings.backbone, weights_file, settings.seed, dev, calibration
    )
    shard = (
        distributed.inference_shard(len(dataset), settings.batch_size, processes)
        if processes.many
        else range(len(dataset))
    )
    loader = data.make_loader(
        torch.utils.data.Subset(dataset, shard) if processes.many else dataset,
        settings.batch_size,
        workers=workers,
        pin_memory=_pin(dev),
    )
    started = time.perf_counter()
    feats, labels = _backbone_features(
        model,
        usage.measure(loader, "extract"),
        dev,
        len(shard),
        # Known before the first batch, and to a process whose shard holds no image.
        models.feature_dim(model, settings.image_size, dev),
    )
    if processes.many:
        feats = distributed.gather_in_order(feats, processes, to_all=False)
        labels = distributed.gather_in_order(labels, processes, to_all=False)
    seconds = time.perf_counter() - started
    if not processes.is_main:
        processes.barrier()
        return None
    log.info(
        "extract_features %s: %d images x %d views -> %s on %s, %.1f images/s",
        split,
        len(rows),
        views,
        tuple(feats.shape),
        dev,
        len(dataset) / max(seconds, 1e-9),
    )
    result = FeatureFile(
        identity=ModelIdentity(
            backbone=settings.backbone,
            weights=settings.weights,
            image_size=settings.image_size,
            mean=list(settings.mean),
            std=list(settings.std),
            seed=settings.seed,
            classes=classes,
        ),
        split=split,
        features=feats,
        labels=labels,
        views=torch.arange(len(dataset)) // len(rows),
        paths=[r.path for r in rows],
        seconds=seconds,
        # Random weights have no file to reload from: the checkpoints carry them.
        backbone_state=(
            {k: v.cpu() for k, v in model.state_dict().items()} if weights_file is None else None
        ),
    )
    checkpoint.save(result, output)
    if usage_out:
        usage.write(usage_out)
    processes.barrier()
    return result


@torch.inference_mode()
def _backbone_features(
    model, loader, device, n: int, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (n x D, float32, on the CPU) and labels of every image, in loader order.

    Written batch by batch into one tensor allocated up front: a
    million images x 1280 floats are 5 GB, and collecting batches to concatenate them
    would need twice that at the end.
    """
    model.eval()
    features = torch.empty((n, dim), dtype=torch.float32)
    labels = torch.empty(n, dtype=torch.int64)
    done = 0
    for inputs, batch_labels in loader:
        inputs = inputs.to(device, non_blocking=True)
        batch = model(inputs.contiguous(memory_format=torch.channels_last)).flatten(1)
        features[done : done + len(batch)] = batch.float()
        labels[done : done + len(batch)] = batch_labels
        done += len(batch)
    if done != n:
        raise RuntimeError(f"the loader gave {done} images, the dataset has {n}")
    return features, labels


def _plain_view_statistics(features: FeatureFile, rows: int = 1 << 12):
    """Mean and standard deviation (n - 1) per feature over the plain view (view 0), as
    float32, read in blocks of `rows` (4096 x 1280 doubles: 40 MB): on memory-mapped
    features no full copy is made.

    Two passes in float64 (mean, then squared deviations): random-init features are ~1e-10
    with far smaller spread, where E[x^2] - E[x]^2 would cancel to noise.
    """

    def blocks():
        for start in range(0, len(features.views), rows):
            block = features.features[start : start + rows]
            plain = features.views[start : start + rows] == 0
            yield block if bool(plain.all()) else block[plain]

    total = torch.zeros(features.features.shape[1], dtype=torch.float64)
    count = 0
    for block in blocks():
        total += block.sum(0, dtype=torch.float64)
        count += len(block)
    mean = total / max(count, 1)
    squares = torch.zeros_like(total)
    for block in blocks():
        deviations = block.double()
        deviations -= mean
        squares += deviations.square_().sum(0)
    std = (squares / max(count - 1, 1)).sqrt() if count > 1 else torch.full_like(mean, math.nan)
    return mean.float(), std.float()


def train_head(
    settings: HeadSettings,
    *,
    train_features: str,
    val_features: str,
    output: str,
    history: str,
    resume: str | None = None,
    device: str = "auto",
    observers: Sequence[EpochObserver] = (),
) -> StageCheckpoint:
    """Train dropout + linear on cached features: seconds, not minutes, for any epoch count."""
    seed_everything(settings.seed)
    dev = pick_device(device)
    train = checkpoint.load_features(train_features)
    val = checkpoint.load_features(val_features)
    if train.identity != val.identity:
        raise UserError(f"{train_features} and {val_features} come from different extractions")
    classes = train.identity.classes
    torch.manual_seed(settings.seed)
    head = models.Head(train.features.shape[1], len(classes), settings.dropout)
    # Standardise with the original images only: augmented views would weigh double.
    # (Head.fit_standardisation's rule, on statistics computed block by block: the
    # features are memory-mapped, and selecting the plain view would copy them.)
    mean, std = _plain_view_statistics(train)
    with torch.no_grad():
        head.mean.copy_(mean)
        head.std.copy_(torch.where(std > 0, std, torch.ones_like(std)))
    head.to(dev)
    train_set = TensorDataset(train.features, train.labels)
    val_loader = data.make_loader(TensorDataset(val.features, val.labels), 1024)
    optimizer = torch.optim.Adam(head.parameters(), lr=settings.lr)
    scheduler = warmup_then_constant(optimizer, 0, 1.0)
    inputs = {
        "train": checkpoint.features_fingerprint(train),
        "val": checkpoint.features_fingerprint(val),
    }
    result = fit(
        head,
        lambda epoch: data.make_loader(
            train_set, settings.batch_size, shuffle=True, seed=settings.seed, epoch=epoch
        ),
        val_loader,
        optimizer,
        scheduler,
        num_classes=len(classes),
        epochs=settings.epochs,
        seed=settings.seed,
        device=dev,
        early_stopping=EarlyStopping(),
        resume_path=resume,
        resume_key=checkpoint.resume_key(settings, inputs),
        stage="train_head",
        observers=observers,
    )
    return _keep(
        result,
        settings,
        output=output,
        history=history,
        resume=resume,
        stage="head",
        identity=train.identity,
        feature_dim=int(train.features.shape[1]),
        dropout=settings.dropout,
        head={k: v.cpu() for k, v in result.best_state.items()},
        backbone_state=train.backbone_state,
    )


def _keep(result, settings, *, output: str, history: str, resume: str | None, **fields):
    """Write a training stage's outputs: history, then the checkpoint of its best epoch.

    The resume state goes only once both are complete.
    """
    saved = StageCheckpoint(
        settings=settings.to_dict(),
        best_epoch=result.best_epoch,
        best_val_loss=result.best_val_loss,
        kept=result.kept,
        epochs_run=len(result.history),
        train_seconds=result.seconds,
        **fields,
    )
    write_history(history, result.history)
    checkpoint.save(saved, output)
    if resume:
        Path(resume).unlink(missing_ok=True)
    return saved


def model_for_finetune(
    start: StageCheckpoint, settings: FinetuneSettings, weights_file: str | None = None
):
    """The head's classifier with its last blocks trainable; (model, modules kept in eval).

    With `batchnorm: frozen` every BatchNorm layer keeps the running statistics the head
    was trained on (its weights still train), so fine tuning continues the head instead of
    meeting other features. `auto` freezes them for pretrained weights and trains them for
    random ones, whose statistics must change with weights that are learnt from scratch
    (README, the fine-tuning study). In eval mode the assembled model gives the head's own
    logits either way.
    """
    model = models.classifier_from_checkpoint(start, weights_file)
    frozen = models.set_trainable(model, settings.unfreeze_blocks)
    batchnorm = settings.batchnorm_for(start.identity.weights)
    log.info("finetune: batchnorm %s (weights %s)", batchnorm, start.identity.weights)
    if batchnorm == "frozen":
        frozen = [*frozen, *models.batchnorm_layers(model)]
    return model, frozen


def finetune(
    settings: FinetuneSettings,
    *,
    head_checkpoint: str,
    manifest: str,
    data_root: str,
    splits: Sequence[str],
    output: str,
    history: str,
    weights_file: str | None = None,
    workers: int = 0,
    resume: str | None = None,
    device: str = "auto",
    usage_out: str | None = None,
    observers: Sequence[EpochObserver] = (),
) -> StageCheckpoint | None:
    """Train the last backbone blocks and the head together on augmented images.

    `usage_out` receives the GPU figures of every pass (usage.py); `observers` follow the
    epochs (TensorBoard, MLflow).

    Started by torchrun as several processes (distributed.py), each trains on its share of
    every batch of `batch_size` images and validates its shard of the validation split;
    rank 0 writes the outputs and returns the checkpoint, the others return None. The
    usage figures are rank 0's, i.e. one GPU's.
    """
    seed_everything(settings.seed, settings.deterministic)
    processes = distributed.setup(device)
    dev = processes.device
    start = checkpoint.load_stage(head_checkpoint)
    model, frozen = model_for_finetune(start, settings, weights_file)
    model = distributed.sync_batchnorm(model, frozen, processes)
    trainable, fixed = models.count_parameters(model)
    log.info("finetune: %d trainable, %d frozen parameters", trainable, fixed)
    model.to(dev).to(memory_format=torch.channels_last)
    usage = UsageLog("finetune", dev)

    records = data.read_manifest(manifest)
    identity = start.identity
    train_split, val_split = splits[0], splits[1]
    train_rows = data.split_records(records, train_split)
    val_rows = data.split_records(records, val_split)
    common = dict(image_size=identity.image_size, mean=identity.mean, std=identity.std)
    train_set = data.ImageDataset(
        data_root,
        train_rows,
        identity.classes,
        augment_all=True,
        seed=settings.seed,
        augment=settings.augment,
        **common,
    )
    val_set = data.ImageDataset(data_root, val_rows, identity.classes, **common)
    batch = settings.batch_size
    val_shard = distributed.inference_shard(len(val_set), batch * 4, processes)
    val_loader = data.make_loader(
        torch.utils.data.Subset(val_set, val_shard) if processes.many else val_set,
        batch * 4,
        workers=workers,
        pin_memory=_pin(dev),
    )
    train_loader = data.make_loader(
        train_set,
        batch,
        shuffle=True,
        seed=settings.seed,
        workers=workers,
        pin_memory=_pin(dev),
        rank=processes.rank,
        world_size=processes.world_size,
    )

    def train_loader_for(epoch: int):
        train_loader.sampler.set_epoch(epoch)
        return train_loader

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=settings.lr)
    scheduler = warmup_then_constant(
        optimizer, settings.warmup_epochs, settings.warmup_start_factor
    )
    inputs = {
        "head": checkpoint.stage_fingerprint(start),
        "train": checkpoint.manifest_rows_fingerprint(train_rows),
        "val": checkpoint.manifest_rows_fingerprint(val_rows),
        "weights": checkpoint.file_fingerprint(weights_file),
    }
    result = fit(
        model,
        train_loader_for,
        val_loader,
        optimizer,
        scheduler,
        num_classes=len(identity.classes),
        epochs=settings.epochs,
        seed=settings.seed,
        device=dev,
        early_stopping=EarlyStopping(settings.patience, settings.min_delta, settings.monitor),
        restore_best=settings.restore_best,
        resume_path=resume,
        resume_key=checkpoint.resume_key(settings, inputs),
        frozen=frozen,
        amp=settings.amp,
        stage="finetune",
        usage=usage,
        observers=observers,
        processes=processes,
    )
    if not processes.is_main:
        processes.barrier()  # rank 0 writes the outputs
        return None
    if usage_out:
        usage.write(usage_out)
    saved = _keep(
        result,
        settings,
        output=output,
        history=history,
        resume=resume,
        stage="finetune",
        identity=identity,
        feature_dim=start.feature_dim,
        dropout=start.dropout,
        model={k: v.cpu() for k, v in result.best_state.items()},
        trainable_parameters=trainable,
    )
    processes.barrier()
    return saved


def evaluate(
    settings: EvaluateSettings,
    *,
    checkpoint_path: str,
    manifest: str,
    data_root: str,
    splits: Sequence[str],
    metrics_out: str,
    predictions_out: str,
    confusion_out: str,
    weights_file: str | None = None,
    workers: int = 0,
    device: str = "auto",
    usage_out: str | None = None,
) -> list[dict]:
    """Metrics, per-image predictions and confusion counts of one stage model per split.

    Started by torchrun as several processes, each predicts a shard of whole batches of every
    split; rank 0 gathers the logits in order and writes the same files as one process
    (the others return []). The usage figures are rank 0's, i.e. one GPU's.
    """
    processes = distributed.setup(device)
    dev = processes.device
    state = checkpoint.load_stage(checkpoint_path)
    usage = UsageLog(f"evaluate {state.stage}", dev)
    model = models.classifier_from_checkpoint(state, weights_file)
    model = model.to(dev).to(memory_format=torch.channels_last)
    identity = state.identity
    classes = identity.classes
    records = data.read_manifest(manifest)
    metric_rows, prediction_rows, confusion_rows = [], [], []
    for split in splits:
        rows = data.split_records(records, split)
        dataset = data.ImageDataset(
            data_root, rows, classes, identity.image_size, identity.mean, identity.std
        )
        if processes.many:
            shard = distributed.inference_shard(len(dataset), settings.batch_size, processes)
            dataset = torch.utils.data.Subset(dataset, shard)
        loader = data.make_loader(
            dataset, settings.batch_size, workers=workers, pin_memory=_pin(dev)
        )
        logits, labels = predict(model, loader, dev, usage=usage, pass_name=split)
        logits = distributed.gather_in_order(logits, processes, to_all=False)
        labels = distributed.gather_in_order(labels, processes, to_all=False)
        if not processes.is_main:
            continue
        probs = models.probabilities(logits, len(classes)).numpy()
        true = labels.numpy()
        row = {"split": split, **metrics.classification_metrics(true, probs, classes)}
        metric_rows.append(row)
        log.info(
            "evaluate %s %s: n %d loss %.4f accuracy %.4f macro_f1 %.4f",
            state.stage,
            split,
            row["n"],
            row["loss"],
            row["accuracy"],
            row["macro_f1"],
        )
        predicted = probs.argmax(1)
        for record, t, p, pr in zip(rows, true, predicted, probs, strict=True):
            prediction_rows.append(
                {
                    "split": split,
                    "path": record.path,
                    "true": classes[t],
                    "predicted": classes[p],
                    "probability": float(pr[p]),
                    **{f"p_{name}": float(pr[k]) for k, name in enumerate(classes)},
                }
            )
        matrix = metrics.confusion_matrix(true, predicted, len(classes))
        for i, true_name in enumerate(classes):
            for j, predicted_name in enumerate(classes):
                confusion_rows.append(
                    {
                        "split": split,
                        "true": true_name,
                        "predicted": predicted_name,
                        "count": int(matrix[i, j]),
                    }
                )
    metric_columns = ["split", "n", "loss", "accuracy"]
    for name in classes:
        metric_columns += [f"precision_{name}", f"recall_{name}", f"f1_{name}"]
    metric_columns += ["macro_f1", "roc_auc"]
    if processes.is_main:
        write_tsv(predictions_out, prediction_rows)
        write_tsv(confusion_out, confusion_rows, ["split", "true", "predicted", "count"])
        write_tsv(metrics_out, metric_rows, metric_columns)
        if usage_out:
            usage.write(usage_out)
    processes.barrier()
    return metric_rows
