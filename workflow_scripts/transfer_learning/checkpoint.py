"""The files stages hand to each other: feature files, stage checkpoints, resume state.

Each is a typed record here and, on disk, a flat dict of tensors and plain values (so it
loads with `torch.load(weights_only=True)`) tagged with its kind and a format version.
Every reader and writer goes through this module; a file of another kind or version is
refused with a message saying which stage to re-run, never half-read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import InputNotFound, UserError
from .io import load_checkpoint, save_checkpoint, sha256_file

FORMAT_VERSION = 2
# Which rule writes each kind, for the message that asks to re-run it.
WRITTEN_BY = {
    "features": "extract_features",
    "stage": "train_head or finetune",
    "resume": "the same stage (the stale resume file is ignored)",
}


@dataclass
class ModelIdentity:
    """What a model needs besides its weights: backbone, preprocessing, class names."""

    backbone: str
    weights: str | None
    image_size: int
    mean: list[float]
    std: list[float]
    seed: int
    classes: list[str]


@dataclass
class FeatureFile:
    """One split run through the frozen backbone (`extract_features`)."""

    identity: ModelIdentity
    split: str
    features: torch.Tensor  # N*views x D
    labels: torch.Tensor
    views: torch.Tensor  # which view each row is; 0 = the plain image
    paths: list[str]
    seconds: float = 0.0
    # A random-init backbone has no weights file to reload from: it travels here.
    backbone_state: dict | None = None


@dataclass
class StageCheckpoint:
    """The kept weights of `train_head` (head only) or `finetune` (whole classifier)."""

    stage: str
    identity: ModelIdentity
    feature_dim: int
    dropout: float
    settings: dict
    best_epoch: int
    best_val_loss: float
    epochs_run: int
    train_seconds: float
    # Which epoch's weights these are, and why (monitor, early stop), in words.
    kept: str = ""
    head: dict | None = None
    model: dict | None = None
    backbone_state: dict | None = None
    trainable_parameters: int | None = None


@dataclass
class ResumeState:
    """Everything to continue a training after its last finished epoch."""

    key: str
    epoch: int
    seconds: float
    model: dict
    optimizer: dict
    scheduler: dict
    scaler: dict
    early_stopping: dict
    best_model: dict
    history: list[dict] = field(default_factory=list)
    usage: list[dict] = field(default_factory=list)  # usage.UsageLog rows of earlier jobs


_KINDS = {FeatureFile: "features", StageCheckpoint: "stage", ResumeState: "resume"}


def _to_payload(record) -> dict:
    payload = {"format": _KINDS[type(record)], "format_version": FORMAT_VERSION}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if f.name == "identity":
            payload.update(dataclasses.asdict(value))
        elif value is not None:
            payload[f.name] = value
    return payload


def _from_payload(cls, payload: Mapping, path) -> object:
    kind = _KINDS[cls]
    found, version = payload.get("format"), payload.get("format_version", 1)
    if found != kind or version != FORMAT_VERSION:
        what = f"a {found} file" if found else "a file without a format tag"
        raise UserError(
            f"{path} is {what} of format version {version}; this workflow reads {kind} files "
            f"of version {FORMAT_VERSION}. Re-run {WRITTEN_BY[kind]} to rewrite it "
            "(snakemake --forcerun <rule>)"
        )
    values = {}
    for f in dataclasses.fields(cls):
        if f.name == "identity":
            names = [g.name for g in dataclasses.fields(ModelIdentity)]
            values["identity"] = ModelIdentity(**{n: payload[n] for n in names})
        elif f.name in payload:
            values[f.name] = payload[f.name]
    return cls(**values)


def save(record, path: str | os.PathLike) -> None:
    """Write a FeatureFile, StageCheckpoint or ResumeState atomically."""
    save_checkpoint(_to_payload(record), path)


def _load(cls, path: str | os.PathLike, mmap: bool = False):
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"{_KINDS[cls]} file not found: {path}")
    if mmap:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    else:
        payload = load_checkpoint(path)
    return _from_payload(cls, payload, path)


def load_features(path: str | os.PathLike, mmap: bool = True) -> FeatureFile:
    """A feature file, its tensors memory-mapped by default: a million images x 1280 floats
    are 5 GB that the page cache holds once, never a second copy in the process (the
    mapping is private: writing to a tensor never changes the file)."""
    return _load(FeatureFile, path, mmap=mmap)


def load_stage(path: str | os.PathLike) -> StageCheckpoint:
    return _load(StageCheckpoint, path)


def load_resume(path: str | os.PathLike) -> ResumeState:
    return _load(ResumeState, path)


# ---- what a run depends on ---------------------------------------------------------------


def _feed(digest, value) -> None:
    """Hash nested tensors, dicts, lists and plain values by content, in a stable order."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        # The tensor's own memory, not a bytes copy of it: a feature file's 5 GB are hashed
        # where they lie (memory-mapped), without a second 5 GB.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, Mapping):
        digest.update(b"{")
        for key in sorted(value, key=str):
            digest.update(json.dumps(str(key)).encode())
            _feed(digest, value[key])
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(b"[")
        for item in value:
            _feed(digest, item)
        digest.update(b"]")
    elif dataclasses.is_dataclass(value):
        _feed(digest, {f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    else:
        digest.update(json.dumps(value, default=str).encode())


def fingerprint(value) -> str:
    """Content digest of a record or nested structure (tensors by their bytes)."""
    digest = hashlib.sha256()
    _feed(digest, value)
    return digest.hexdigest()


def features_fingerprint(features: FeatureFile) -> str:
    """What training sees of a feature file: timing and file bytes do not count."""
    return fingerprint(dataclasses.replace(features, seconds=0.0))


def stage_fingerprint(stage: StageCheckpoint) -> str:
    return fingerprint(dataclasses.replace(stage, train_seconds=0.0))


def manifest_rows_fingerprint(records: Iterable) -> str:
    """The manifest rows a stage reads, with their image hashes (content, not timestamps)."""
    return fingerprint([dataclasses.asdict(r) for r in records])


def file_fingerprint(path: str | os.PathLike | None) -> str | None:
    return None if path is None else sha256_file(path)


def resume_key(settings, inputs: Mapping[str, str | None]) -> str:
    """A training may resume only from state made with these settings and these inputs."""
    return fingerprint({"settings": settings, "inputs": dict(inputs)})[:16]
