"""One stage's model as files other programs load without this package (`export`).

Two files, each with a JSON sidecar that says how to feed it and read it:
- `<stage>.onnx` for ONNX Runtime (and anything else that reads ONNX), opset `ONNX_OPSET`,
  made by PyTorch's torch.export-based exporter (the default since PyTorch 2.9; the older
  TorchScript-based one is deprecated);
- `<stage>.pt2`, a `torch.export` program: `torch.export.load(path).module()` in plain
  PyTorch of the same version.
Both take a float32 batch `images` of N x 3 x size x size (N free) and return two outputs:
`probabilities`, N x classes in the order of the sidecar's `classes` (what evaluate and
predict report), and `logits`, the raw head output. Preprocessing stays outside the files:
torchvision resizes a PIL image with PIL's own antialiased bilinear filter, which no graph
operator reproduces bit for bit, and the sidecar says the four steps.

The export job checks its own work: both files must give the checkpoint's probabilities on
a random batch to 1e-4, or the job fails.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from . import checkpoint, models
from .io import atomic_path

log = logging.getLogger("transfer_learning")

# The ONNX operator set the files use (ONNX 1.13; ONNX Runtime 1.14 and later read it).
ONNX_OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAMES = ["probabilities", "logits"]
# What the exported files may differ from the checkpoint's own model, per probability.
TOLERANCE = 1e-4
CHECK_BATCH = 3

PREPROCESS = [
    "decode the file as 8-bit RGB, upright by its EXIF orientation; transparent pixels over "
    "white (PIL: ImageOps.exif_transpose(Image.open(path)).convert('RGB') for opaque images)",
    "resize to image_size x image_size, no crop, with PIL's bilinear filter "
    "(image.resize((image_size, image_size), Image.BILINEAR))",
    "scale the 0..255 values to 0..1 (float32)",
    "subtract mean and divide by std per channel (R, G, B), then lay out as "
    "N x 3 x image_size x image_size",
]


class WithProbabilities(nn.Module):
    """The classifier, returning class probabilities as evaluate computes them, and logits."""

    def __init__(self, model: nn.Module, num_classes: int):
        super().__init__()
        self.model = model
        self.num_classes = num_classes

    def forward(self, images: torch.Tensor):
        logits = self.model(images)
        return models.probabilities(logits, self.num_classes), logits


def convention(classes: list[str]) -> str:
    """How the probabilities come from the logits, in words."""
    if len(classes) == 2:
        return (
            f"two classes: one logit per image; p({classes[1]}) = sigmoid(logit), "
            f"p({classes[0]}) = 1 - p({classes[1]}); the output probabilities hold both"
        )
    return "one logit per class; probabilities = softmax(logits) over the classes"


def sidecar(
    stage: checkpoint.StageCheckpoint, *, file: str, fmt: str, experiment: str, load: str
) -> dict:
    identity = stage.identity
    size = identity.image_size
    return {
        "file": file,
        "format": fmt,
        "load": load,
        "experiment": experiment,
        "stage": stage.stage,
        "backbone": identity.backbone,
        "weights": identity.weights,
        "classes": list(identity.classes),
        "image_size": size,
        "mean": list(identity.mean),
        "std": list(identity.std),
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", 3, size, size],
            "dtype": "float32",
            "layout": "NCHW, RGB",
        },
        "outputs": {
            "probabilities": "batch x classes, in the order of `classes`",
            "logits": "batch x 1 for two classes, batch x classes otherwise",
        },
        "preprocess": PREPROCESS,
        "probabilities": convention(identity.classes),
        "best_epoch": stage.best_epoch,
        "torch_version": torch.__version__.split("+")[0],
    }


def _write_json(path: str, values: Mapping) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(values, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _check(name: str, expected: torch.Tensor, got) -> None:
    difference = float((expected - torch.as_tensor(got)).abs().max())
    log.info("export: %s probabilities differ from the checkpoint's by %.2g", name, difference)
    if not difference <= TOLERANCE:
        raise RuntimeError(
            f"the exported {name} file gives probabilities {difference:.3g} away from the "
            f"checkpoint's own model (more than {TOLERANCE}); it is not written"
        )


def export_stage(
    *,
    checkpoint_path: str,
    onnx_out: str,
    onnx_sidecar: str,
    program_out: str,
    program_sidecar: str,
    experiment: str,
    weights_file: str | None = None,
) -> None:
    """Write the ONNX file, the torch.export program and their sidecars, after checking
    that both give the checkpoint's probabilities."""
    import onnxruntime  # here: only the export job needs it

    # The exporter's graph passes log every merged constant at INFO level.
    for name in ("onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.WARNING)

    state = checkpoint.load_stage(checkpoint_path)
    classes = state.identity.classes
    size = state.identity.image_size
    model = WithProbabilities(
        models.classifier_from_checkpoint(state, weights_file), len(classes)
    ).eval()
    torch.manual_seed(0)
    example = torch.randn(CHECK_BATCH, 3, size, size)
    with torch.no_grad():
        expected = model(example)[0]
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (example,), dynamic_shapes={INPUT_NAME: {0: batch}})

    with atomic_path(program_out) as tmp:
        torch.export.save(program, tmp)
        _check("torch.export", expected, torch.export.load(tmp).module()(example)[0].detach())
    with atomic_path(onnx_out) as tmp:
        torch.onnx.export(
            program,
            (example,),
            str(tmp),
            dynamo=True,
            opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME],
            output_names=OUTPUT_NAMES,
            # One self-contained file (weights inside): a model over 2 GB cannot be one.
            external_data=False,
        )
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        _check("ONNX", expected, session.run([OUTPUT_NAMES[0]], {INPUT_NAME: example.numpy()})[0])

    common = {"stage": state, "experiment": experiment}
    _write_json(
        onnx_sidecar,
        {
            **sidecar(
                **common,
                file=Path(onnx_out).name,
                fmt=f"ONNX, opset {ONNX_OPSET}",
                load="onnxruntime.InferenceSession(path).run(None, {'images': batch})",
            ),
            "opset": ONNX_OPSET,
        },
    )
    _write_json(
        program_sidecar,
        sidecar(
            **common,
            file=Path(program_out).name,
            fmt=f"torch.export program (PyTorch {torch.__version__.split('+')[0]})",
            load="torch.export.load(path).module()(batch)",
        ),
    )
    log.info(
        "export %s: %d classes, %d px -> %s, %s",
        state.stage,
        len(classes),
        size,
        onnx_out,
        program_out,
    )
