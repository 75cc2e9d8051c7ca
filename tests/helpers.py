"""Helpers shared by several test files (import them from here, never from a test file)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "workflow_scripts") not in sys.path:
    sys.path.insert(0, str(REPO / "workflow_scripts"))

from transfer_learning.checkpoint import ModelIdentity, StageCheckpoint  # noqa: E402


def stage_checkpoint(**fields) -> StageCheckpoint:
    """A small but real head checkpoint record (2 classes, 4 features); fields override."""
    values = dict(
        stage="head",
        identity=ModelIdentity(
            backbone="mobilenet_v2", weights="random", image_size=32,
            mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], seed=1, classes=["cats", "dogs"],
        ),
        feature_dim=4, dropout=0.2, settings={}, best_epoch=1, best_val_loss=0.5,
        epochs_run=1, train_seconds=0.1, head={},
    )  # fmt: skip
    values.update(fields)
    return StageCheckpoint(**values)
