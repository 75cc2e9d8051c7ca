"""Classify a folder of unlabelled images with one stage's model (`predict`).

The images go through exactly what `evaluate` does to an image (`images.load_rgb`, then
`data.eval_transform` with the checkpoint's size and normalisation, then the same model and
`models.probabilities`), so an image gets the same probabilities here as in evaluate's
predictions.tsv. A file that cannot be decoded is skipped with one warning line naming it
and why; one bad photo never costs the predictions of the others.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from . import checkpoint, data, models
from .errors import UserError
from .image_files import walk_images
from .images import load_rgb
from .io import write_tsv
from .train import pick_device, predict
from .usage import UsageLog

log = logging.getLogger("transfer_learning")


class FolderImages(Dataset):
    """(image tensor or None, index) of files under a folder; None where decoding failed."""

    def __init__(self, root: str | os.PathLike, paths: Sequence[str], transform):
        self.root = Path(root)
        self.paths = data.PackedStrings(paths)  # nothing for a forked loader worker to copy
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return self.transform(load_rgb(self.root / self.paths[index])), index
        except Exception:  # any decoding failure: the main process reports it, by name
            return None, index


def readable_only(batch):
    """Collate the decoded images of a batch; the indices say which files they are."""
    kept = [(image, index) for image, index in batch if image is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.stack([image for image, _ in kept]), torch.tensor([i for _, i in kept])


def why_unreadable(path: Path) -> str:
    """The decoder's own words for a file the loader could not decode."""
    try:
        load_rgb(path)
    except UnidentifiedImageError:
        return "not an image file that PIL can read"
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return "could not be decoded in the loader"


def predict_folder(
    *,
    checkpoint_path: str,
    images: str,
    output: str,
    batch_size: int = 64,
    weights_file: str | None = None,
    workers: int = 0,
    device: str = "auto",
    usage_out: str | None = None,
) -> list[dict]:
    """Write one row per readable image under `images`: path (relative, '/'-separated),
    predicted class, its probability and p_<class> for every class, sorted by path."""
    folder = Path(images)
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        raise UserError(f"images folder {images} {what} (config key predict.images)")
    found = walk_images(folder)
    for problem in found.problems:
        log.warning("predict: %s", problem)
    if not found.paths:
        raise UserError(f"no files under {images} (config key predict.images)")

    dev = pick_device(device)
    state = checkpoint.load_stage(checkpoint_path)
    identity = state.identity
    classes = identity.classes
    model = models.classifier_from_checkpoint(state, weights_file)
    model = model.to(dev).to(memory_format=torch.channels_last)
    transform = data.eval_transform(identity.image_size, identity.mean, identity.std)
    loader = DataLoader(
        FolderImages(folder, found.paths, transform),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=readable_only,
        pin_memory=dev.type == "cuda",
        worker_init_fn=data.start_worker if workers > 0 else None,
    )
    usage = UsageLog(f"predict {state.stage}", dev)
    # A batch whose every file was unreadable never reaches the model (not every model
    # accepts an empty batch); the usage row still covers the whole pass.
    batches = (batch for batch in usage.measure(loader, "predict") if len(batch[1]))
    first = next(batches, None)
    rows = []
    if first is not None:
        logits, indices = predict(model, itertools.chain([first], batches), dev)
        probs = models.probabilities(logits, len(classes)).numpy()
        for index, row_probs in zip(indices.tolist(), probs, strict=True):
            best = int(row_probs.argmax())
            rows.append(
                {
                    "path": found.paths[index],
                    "predicted": classes[best],
                    "probability": float(row_probs[best]),
                    **{f"p_{name}": float(row_probs[k]) for k, name in enumerate(classes)},
                }
            )
    predicted = {row["path"] for row in rows}
    skipped = [path for path in found.paths if path not in predicted]
    for path in skipped:
        log.warning("predict: skipped %s: %s", path, why_unreadable(folder / path))
    if not rows:
        raise UserError(
            f"none of the {len(found.paths)} files under {images} is a readable image "
            "(config key predict.images)"
        )
    columns = ["path", "predicted", "probability", *(f"p_{name}" for name in classes)]
    write_tsv(output, rows, columns)
    if usage_out:
        usage.write(usage_out)
    log.info(
        "predict %s: %d images predicted, %d unreadable files skipped, on %s -> %s",
        state.stage,
        len(rows),
        len(skipped),
        dev,
        output,
    )
    return rows
