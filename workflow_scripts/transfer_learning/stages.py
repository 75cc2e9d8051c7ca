"""The workflow's stages as functions: extract_features, train_head, finetune, evaluate.

Each takes plain paths and settings, so it runs the same from its command-line entry point,
from a test, or from a notebook on an interactive node.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from . import data, metrics, models
from .io import load_checkpoint, read_tsv, save_checkpoint, write_tsv
from .settings import digest
from .train import HISTORY_COLUMNS, EarlyStopping, fit, pick_device, predict

log = logging.getLogger("transfer_learning")


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


def _pin(device: torch.device) -> bool:
    return device.type == "cuda"


CALIBRATION_IMAGES = 256


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
        loader = data.make_loader(torch.utils.data.Subset(calibration, range(n)), 32)
        models.calibrate_batchnorm(
            model,
            (x.to(device).contiguous(memory_format=torch.channels_last) for x, _ in loader),
        )
    return model.eval()


def extract_features(
    *,
    manifest: str,
    data_root: str,
    split: str,
    output: str,
    backbone: str,
    train_split: str = "train",
    weights: str | None,
    weights_file: str | None,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    augmented_views: int = 0,
    seed: int = 0,
    batch_size: int = 64,
    workers: int = 0,
    device: str = "auto",
) -> dict:
    """Run the frozen backbone over one split once; save features, labels and identity."""
    dev = pick_device(device)
    records = data.read_manifest(manifest)
    classes = data.class_names(records)
    rows = data.split_records(records, split)
    dataset = data.ImageDataset(
        data_root,
        rows,
        classes,
        image_size,
        mean,
        std,
        views=1 + augmented_views,
        seed=seed,
    )
    calibration = data.ImageDataset(
        data_root, data.split_records(records, train_split), classes, image_size, mean, std
    )
    model = build_model_for_features(backbone, weights_file, seed, dev, calibration)
    loader = data.make_loader(dataset, batch_size, workers=workers, pin_memory=_pin(dev))
    started = time.perf_counter()
    feats, labels = predict(model, loader, dev)
    seconds = time.perf_counter() - started
    log.info(
        "extract_features %s: %d images x %d views -> %s on %s, %.1f images/s",
        split,
        len(rows),
        1 + augmented_views,
        tuple(feats.shape),
        dev,
        len(dataset) / max(seconds, 1e-9),
    )
    payload = {
        "features": feats.flatten(1).contiguous(),
        "labels": labels,
        "views": torch.arange(len(dataset)) // len(rows),
        "paths": [r.path for r in rows],
        "classes": classes,
        "split": split,
        "backbone": backbone,
        "weights": weights,
        "image_size": image_size,
        "mean": list(mean),
        "std": list(std),
        "seed": seed,
        "seconds": seconds,
    }
    if weights_file is None:
        # Random weights have no file to reload from: the checkpoints carry them.
        payload["backbone_state"] = {k: v.cpu() for k, v in model.state_dict().items()}
    save_checkpoint(payload, output)
    return payload


def _identity(payload: dict) -> dict:
    """What a model needs besides its weights: backbone, preprocessing, class names."""
    keys = ("backbone", "weights", "image_size", "mean", "std", "seed", "classes")
    return {k: payload[k] for k in keys}


def warmup_then_constant(optimizer, warmup_epochs: int, start_factor: float):
    """Linear warm-up from start_factor x lr over warmup_epochs, then constant lr."""

    def factor(epoch: int) -> float:
        if warmup_epochs <= 0 or epoch >= warmup_epochs:
            return 1.0
        return start_factor + (1.0 - start_factor) * epoch / warmup_epochs

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def write_history(path: str, history: list[dict]) -> None:
    write_tsv(path, history, HISTORY_COLUMNS)


def train_head(
    *,
    train_features: str,
    val_features: str,
    output: str,
    history: str,
    epochs: int,
    lr: float,
    batch_size: int,
    dropout: float,
    seed: int,
    resume: str | None = None,
    device: str = "auto",
    settings: dict | None = None,
) -> dict:
    """Train dropout + linear on cached features: seconds, not minutes, for any epoch count."""
    seed_everything(seed)
    dev = pick_device(device)
    train = load_checkpoint(train_features)
    val = load_checkpoint(val_features)
    if _identity(train) != _identity(val):
        raise ValueError(f"{train_features} and {val_features} come from different extractions")
    classes = train["classes"]
    torch.manual_seed(seed)
    head = models.Head(train["features"].shape[1], len(classes), dropout)
    # Standardise with the original images only: augmented views would weigh double.
    head.fit_standardisation(train["features"][train["views"] == 0])
    head.to(dev)
    train_set = TensorDataset(train["features"], train["labels"])
    val_loader = data.make_loader(TensorDataset(val["features"], val["labels"]), 1024)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    scheduler = warmup_then_constant(optimizer, 0, 1.0)
    settings = dict(settings or {}, epochs=epochs, lr=lr, batch_size=batch_size, dropout=dropout)
    result = fit(
        head,
        lambda epoch: data.make_loader(train_set, batch_size, shuffle=True, seed=seed, epoch=epoch),
        val_loader,
        optimizer,
        scheduler,
        num_classes=len(classes),
        epochs=epochs,
        seed=seed,
        device=dev,
        early_stopping=EarlyStopping(),
        resume_path=resume,
        settings_hash=digest([settings, _identity(train)]),
        stage="train_head",
    )
    checkpoint = {
        "stage": "head",
        **_identity(train),
        "feature_dim": int(train["features"].shape[1]),
        "dropout": dropout,
        "head": {k: v.cpu() for k, v in result.best_state.items()},
        **({"backbone_state": train["backbone_state"]} if "backbone_state" in train else {}),
        "best_epoch": result.best_epoch,
        "best_val_loss": result.best_val_loss,
        "epochs_run": len(result.history),
        "train_seconds": result.seconds,
        "settings": settings,
    }
    write_history(history, result.history)
    save_checkpoint(checkpoint, output)
    _remove(resume)
    return checkpoint


def _remove(path: str | None) -> None:
    if path:
        Path(path).unlink(missing_ok=True)


def model_from_checkpoint(checkpoint: dict, weights_file: str | None = None) -> models.Classifier:
    """Backbone + head from a stage checkpoint; head checkpoints need the backbone weights."""
    backbone = models.build_backbone(checkpoint["backbone"], None)
    head = models.Head(checkpoint["feature_dim"], len(checkpoint["classes"]), checkpoint["dropout"])
    model = models.Classifier(backbone, head)
    if "model" in checkpoint:
        model.load_state_dict(checkpoint["model"])
        return model
    if "backbone_state" in checkpoint:
        model.backbone.load_state_dict(checkpoint["backbone_state"])
    elif weights_file is None:
        raise ValueError(
            f"the {checkpoint['stage']} checkpoint needs its backbone weights "
            f"({checkpoint['weights']}); pass the weights file"
        )
    else:
        model.backbone = models.build_backbone(checkpoint["backbone"], weights_file)
    model.head.load_state_dict(checkpoint["head"])
    return model


def finetune(
    *,
    head_checkpoint: str,
    manifest: str,
    data_root: str,
    splits: Sequence[str],
    weights_file: str | None,
    output: str,
    history: str,
    epochs: int,
    lr: float,
    batch_size: int,
    unfreeze_blocks: int | None,
    warmup_epochs: int,
    warmup_start_factor: float,
    patience: int,
    min_delta: float,
    seed: int,
    amp: bool = True,
    deterministic: bool = True,
    workers: int = 0,
    resume: str | None = None,
    device: str = "auto",
    settings: dict | None = None,
) -> dict:
    """Train the last backbone blocks and the head together on augmented images."""
    seed_everything(seed, deterministic)
    dev = pick_device(device)
    start = load_checkpoint(head_checkpoint)
    model = model_from_checkpoint(start, weights_file)
    frozen = models.set_trainable(model, unfreeze_blocks)
    trainable, fixed = models.count_parameters(model)
    log.info("finetune: %d trainable, %d frozen parameters", trainable, fixed)
    model.to(dev).to(memory_format=torch.channels_last)

    records = data.read_manifest(manifest)
    classes = start["classes"]
    train_split, val_split = splits[0], splits[1]
    common = dict(image_size=start["image_size"], mean=start["mean"], std=start["std"])
    train_set = data.ImageDataset(
        data_root,
        data.split_records(records, train_split),
        classes,
        augment_all=True,
        seed=seed,
        **common,
    )
    val_set = data.ImageDataset(
        data_root, data.split_records(records, val_split), classes, **common
    )
    val_loader = data.make_loader(val_set, batch_size * 4, workers=workers, pin_memory=_pin(dev))

    train_loader = data.make_loader(
        train_set, batch_size, shuffle=True, seed=seed, workers=workers, pin_memory=_pin(dev)
    )

    def train_loader_for(epoch: int):
        train_loader.sampler.set_epoch(epoch)
        return train_loader

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    scheduler = warmup_then_constant(optimizer, warmup_epochs, warmup_start_factor)
    settings = dict(
        settings or {},
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        unfreeze_blocks=unfreeze_blocks,
        warmup_epochs=warmup_epochs,
        warmup_start_factor=warmup_start_factor,
        patience=patience,
        min_delta=min_delta,
        seed=seed,
        amp=amp,
    )
    result = fit(
        model,
        train_loader_for,
        val_loader,
        optimizer,
        scheduler,
        num_classes=len(classes),
        epochs=epochs,
        seed=seed,
        device=dev,
        early_stopping=EarlyStopping(patience, min_delta),
        resume_path=resume,
        settings_hash=digest([settings, start["head"]["linear.weight"].sum().item()]),
        frozen=frozen,
        amp=amp,
        stage="finetune",
    )
    checkpoint = {
        **_identity(start),
        "feature_dim": start["feature_dim"],
        "dropout": start["dropout"],
        "stage": "finetune",
        "model": {k: v.cpu() for k, v in result.best_state.items()},
        "best_epoch": result.best_epoch,
        "best_val_loss": result.best_val_loss,
        "epochs_run": len(result.history),
        "train_seconds": result.seconds,
        "trainable_parameters": trainable,
        "settings": settings,
    }
    write_history(history, result.history)
    save_checkpoint(checkpoint, output)
    _remove(resume)
    return checkpoint


def evaluate(
    *,
    checkpoint: str,
    manifest: str,
    data_root: str,
    splits: Sequence[str],
    metrics_out: str,
    predictions_out: str,
    confusion_out: str,
    weights_file: str | None = None,
    batch_size: int = 64,
    workers: int = 0,
    device: str = "auto",
) -> list[dict]:
    """Metrics, per-image predictions and confusion counts of one stage model per split."""
    dev = pick_device(device)
    state = load_checkpoint(checkpoint)
    model = model_from_checkpoint(state, weights_file).to(dev).to(memory_format=torch.channels_last)
    classes = state["classes"]
    records = data.read_manifest(manifest)
    metric_rows, prediction_rows, confusion_rows = [], [], []
    for split in splits:
        rows = data.split_records(records, split)
        dataset = data.ImageDataset(
            data_root, rows, classes, state["image_size"], state["mean"], state["std"]
        )
        loader = data.make_loader(dataset, batch_size, workers=workers, pin_memory=_pin(dev))
        logits, labels = predict(model, loader, dev)
        probs = models.probabilities(logits, len(classes)).numpy()
        true = labels.numpy()
        row = {"split": split, **metrics.classification_metrics(true, probs, classes)}
        metric_rows.append(row)
        log.info(
            "evaluate %s %s: n %d loss %.4f accuracy %.4f macro_f1 %.4f",
            state["stage"],
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
    write_tsv(predictions_out, prediction_rows)
    write_tsv(confusion_out, confusion_rows, ["split", "true", "predicted", "count"])
    write_tsv(metrics_out, metric_rows, metric_columns)
    return metric_rows


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def summary_row(run: dict, test_split: str = "test") -> dict:
    """One experiment and stage: its overrides, test metrics and training effort."""
    state = load_checkpoint(run["checkpoint"])
    by_split = {r["split"]: r for r in read_tsv(run["metrics"])}
    if test_split not in by_split:
        raise ValueError(f"{run['metrics']} has no row for split '{test_split}'")
    test = by_split[test_split]
    row = {"experiment": run["experiment"], "stage": run["stage"]}
    row.update(_flatten(run.get("overrides") or {}))
    for name in ("accuracy", "macro_f1", "roc_auc", "loss"):
        row[f"test_{name}"] = float(test[name]) if test.get(name) not in (None, "") else None
    row["epochs_run"] = state["epochs_run"]
    row["best_epoch"] = state["best_epoch"]
    row["train_seconds"] = round(float(state["train_seconds"]), 2)
    return row


def summarize(rows: list[dict], output: str, sort_by: str = "test_accuracy") -> None:
    """One row per experiment and stage; the best by `sort_by` is marked."""

    def score(row: dict) -> float:
        value = row.get(sort_by)
        return -np.inf if value is None or np.isnan(value) else float(value)

    # Stable sort: ties keep the experiments' configured order.
    rows = sorted(rows, key=score, reverse=True)
    for i, row in enumerate(rows):
        row["best"] = "yes" if i == 0 else ""
    columns = list(dict.fromkeys(c for r in rows for c in r))
    write_tsv(output, rows, columns)
