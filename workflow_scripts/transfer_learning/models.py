"""Backbones by name, their weights, the classification head, and what fine tuning trains.

Nothing here knows a particular architecture: the classifier to drop, the feature dimension
and the list of blocks are all found by looking at the model torchvision builds.
Names of backbones and weights are checked by `catalog` (no PyTorch, so the workflow loads
without it); they are re-exported here for the stages.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision
from torch import nn

from .catalog import (  # noqa: F401  (re-exported: one source of truth for the names)
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_backbone,
    is_weights_path,
    normalisation,
    resolve_weights,
    url_filename,
    weights_filename,
)
from .errors import InputNotFound, UserError


def _classifier_child(model: nn.Module) -> str:
    """Name of the last top-level child holding a Linear layer: torchvision's classifier."""
    name = None
    for child_name, child in model.named_children():
        if any(isinstance(m, nn.Linear) for m in child.modules()):
            name = child_name
    if name is None:
        raise UserError(f"{type(model).__name__} has no linear classifier to replace")
    return name


def strip_classifier(model: nn.Module) -> str:
    """Turn a classifier into a feature extractor in place; returns the classifier's name.

    Only the Linear and Dropout layers go: normalisation or flattening inside the classifier
    (ConvNeXt, for one) stays, so the output is the pooled feature vector.
    """
    name = _classifier_child(model)
    child = getattr(model, name)
    if isinstance(child, (nn.Linear, nn.Dropout)):
        setattr(model, name, nn.Identity())
        return name
    for sub_name, sub in list(child.named_modules()):
        if sub_name and isinstance(sub, (nn.Linear, nn.Dropout)):
            parent = child.get_submodule(sub_name.rpartition(".")[0]) if "." in sub_name else child
            setattr(parent, sub_name.rpartition(".")[2], nn.Identity())
    return name


def load_state_dict_file(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"weights file not found: {path} (config key model.weights)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{path} does not hold a state dict")
    return state


def load_backbone_weights(model: nn.Module, state: dict, classifier: str, source) -> None:
    """Load a full-model state dict, ignoring classifier keys of any shape."""

    def backbone_only(tensors: dict) -> dict:
        return {k: v for k, v in tensors.items() if not k.startswith(f"{classifier}.")}

    state, own = backbone_only(state), backbone_only(model.state_dict())
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    wrong_shape = sorted(
        k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or wrong_shape:

        def some(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {some(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {some(unexpected)}")
        if wrong_shape:
            parts.append(f"keys of another shape: {some(wrong_shape)}")
        raise UserError(
            f"weights {source} do not fit backbone {type(model).__name__}: " + "; ".join(parts)
        )
    model.load_state_dict(state, strict=False)


def build_backbone(backbone: str, weights_file: str | os.PathLike | None = None) -> nn.Module:
    """A torchvision model without its classifier; its output is the pooled feature vector.

    `weights_file` is a local state dict (fetched by `fetch_weights` or the user's own); None
    means random initialisation. Compute jobs never download.
    """
    check_backbone(backbone)
    model = torchvision.models.get_model(backbone, weights=None)
    classifier = _classifier_child(model)
    if weights_file is not None:
        state = load_state_dict_file(weights_file)
        load_backbone_weights(model, state, classifier, weights_file)
    strip_classifier(model)
    return model


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, batches) -> None:
    """Set BatchNorm running statistics from data (cumulative average over `batches`).

    A randomly initialised network has running mean 0 / var 1, which matches nothing: in
    eval mode its activations shrink block after block to ~1e-10 and differ in scale from
    the same network in train mode. Calibrated statistics make its features usable.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for images in batches:
        model(images)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.eval()


@torch.no_grad()
def feature_dim(backbone: nn.Module, image_size: int = 224, device=None) -> int:
    """The backbone's feature width, from one blank image through it in eval mode.

    Not from the last layer's shape: what a backbone returns (pooled, flattened, with or
    without a projection) is its own business. One 224 x 224 image costs milliseconds.
    """
    was_training = backbone.training
    backbone.eval()
    with torch.inference_mode():
        out = backbone(torch.zeros(1, 3, image_size, image_size, device=device))
    backbone.train(was_training)
    return int(out.flatten(1).shape[1])


class Head(nn.Module):
    """Standardise features with training statistics, dropout, linear.

    A randomly initialised backbone gives features of tiny scale that a plain linear layer
    barely moves on; standardising inside the head makes every backbone learn at one lr.
    """

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.2):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("std", torch.ones(in_features))
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_features, 1 if num_classes == 2 else num_classes)

    @torch.no_grad()
    def fit_standardisation(self, features: torch.Tensor) -> None:
        self.mean.copy_(features.mean(0))
        std = features.std(0)
        # No absolute floor: random-init features are ~1e-10 yet carry the signal.
        self.std.copy_(torch.where(std > 0, std, torch.ones_like(std)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout((features.flatten(1) - self.mean) / self.std))


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, head: Head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def backbone_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's blocks in forward order, at the granularity of residual blocks.

    Plain nn.Sequential containers are opened (stages of EfficientNet, layers of ResNet);
    blocks without parameters (pooling, activations) are not counted.
    """

    def flatten(module: nn.Module):
        for child in module.children():
            if type(child) is nn.Sequential:
                yield from flatten(child)
            elif any(True for _ in child.parameters()):
                yield child

    return list(flatten(backbone))


def default_unfreeze_blocks(num_blocks: int) -> int:
    """The last quarter: 5 of MobileNetV2's 19 blocks, as the course did (features[14..18])."""
    return max(1, math.ceil(num_blocks / 4))


def set_trainable(model: Classifier, unfreeze_blocks: int | None) -> list[nn.Module]:
    """Freeze the backbone except its last blocks; the head always trains.

    Returns the frozen blocks, which must stay in eval mode while training so that their
    BatchNorm statistics do not drift (the course's notebook let them drift).
    """
    blocks = backbone_blocks(model.backbone)
    n = default_unfreeze_blocks(len(blocks)) if unfreeze_blocks is None else unfreeze_blocks
    n = min(n, len(blocks))
    model.requires_grad_(False)
    model.head.requires_grad_(True)
    for block in blocks[len(blocks) - n :]:
        block.requires_grad_(True)
    frozen = blocks[: len(blocks) - n]
    return frozen


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def train_mode(model: nn.Module, frozen: Sequence[nn.Module]) -> None:
    model.train()
    for block in frozen:
        block.eval()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total - trainable


def loss_function(num_classes: int) -> nn.Module:
    return nn.BCEWithLogitsLoss() if num_classes == 2 else nn.CrossEntropyLoss()


def loss_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return labels.float() if num_classes == 2 else labels.long()


def probabilities(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class probabilities, N x C, from either head shape."""
    if num_classes == 2:
        p = torch.sigmoid(logits.float().squeeze(1))
        return torch.stack([1 - p, p], dim=1)
    return torch.softmax(logits.float(), dim=1)


def logits_for_loss(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    return logits.squeeze(1) if num_classes == 2 else logits


def classifier_from_checkpoint(stage, weights_file: str | os.PathLike | None = None) -> Classifier:
    """Backbone + head from a `checkpoint.StageCheckpoint`.

    A fine-tune checkpoint holds the whole model; a head checkpoint holds the head, and its
    backbone comes from the weights file (or travels in it, for random weights).
    """
    identity = stage.identity
    backbone = build_backbone(identity.backbone, None)
    model = Classifier(backbone, Head(stage.feature_dim, len(identity.classes), stage.dropout))
    if stage.model is not None:
        model.load_state_dict(stage.model)
        return model
    if stage.backbone_state is not None:
        model.backbone.load_state_dict(stage.backbone_state)
    elif weights_file is None:
        raise UserError(
            f"the {stage.stage} checkpoint needs its backbone weights "
            f"({identity.weights}); pass the weights file"
        )
    else:
        model.backbone = build_backbone(identity.backbone, weights_file)
    model.head.load_state_dict(stage.head)
    return model
