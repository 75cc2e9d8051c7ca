"""The exported model files, loaded the way a user outside this package loads them: ONNX
Runtime for the .onnx file, plain PyTorch for the torch.export program, preprocessing as
the sidecar says, in a separate Python that never imports transfer_learning. Both must give
the workflow's own test-split probabilities (evaluate's predictions.tsv) to 1e-4. The
exports are the shared small_run's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from helpers import snake_env
from transfer_learning.export import ONNX_OPSET
from transfer_learning.io import read_tsv

# A user's script: only onnxruntime, torch, PIL and numpy, and the sidecar. Arguments:
# the export folder, then the images; it prints the probabilities of both stages' files.
PLAIN_PYTHON = r"""
import json, sys
import numpy as np, onnxruntime, torch
from PIL import Image, ImageOps

folder, *paths = sys.argv[1:]
result = {}
for stage in ("head", "finetune"):
    sidecar = json.load(open(f"{folder}/{stage}.onnx.json"))
    size = sidecar["image_size"]
    mean = np.array(sidecar["mean"], dtype=np.float32)
    std = np.array(sidecar["std"], dtype=np.float32)

    def pixels(path):
        image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        image = image.resize((size, size), Image.BILINEAR)
        return ((np.asarray(image, dtype=np.float32) / 255 - mean) / std).transpose(2, 0, 1)

    batch = np.stack([pixels(p) for p in paths])
    session = onnxruntime.InferenceSession(
        f"{folder}/{stage}.onnx", providers=["CPUExecutionProvider"]
    )
    program = torch.export.load(f"{folder}/{stage}.pt2").module()
    with torch.no_grad():
        result[stage] = {
            "onnx": session.run(["probabilities"], {"images": batch})[0].tolist(),
            "onnx_one": session.run(["probabilities"], {"images": batch[:1]})[0].tolist(),
            "program": program(torch.from_numpy(batch))[0].numpy().tolist(),
            "program_one": program(torch.from_numpy(batch[:1]))[0].numpy().tolist(),
        }
result["package_imported"] = any(m.startswith("transfer_learning") for m in sys.modules)
print(json.dumps(result))
"""


def test_exports_reproduce_the_workflows_test_probabilities(small_run):
    tables = {
        stage: [
            row
            for row in read_tsv(small_run / f"results/baseline/eval/{stage}/predictions.tsv")
            if row["split"] == "test"
        ]
        for stage in ("head", "finetune")
    }
    paths = [str(small_run / "data/images" / row["path"]) for row in tables["head"]]
    proc = subprocess.run(
        [sys.executable, "-I", "-c", PLAIN_PYTHON, str(small_run / "results/baseline/export"),
         *paths],
        env=snake_env(), capture_output=True, text=True, timeout=300, cwd=small_run,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["package_imported"] is False
    for stage, rows in tables.items():
        assert [str(small_run / "data/images" / row["path"]) for row in rows] == paths
        expected = [[float(row["p_cats"]), float(row["p_dogs"])] for row in rows]
        for name in ("onnx", "program"):
            got = result[stage][name]
            assert len(got) == len(rows) == 24
            for probabilities, want in zip(got, expected, strict=True):
                assert probabilities == pytest.approx(want, abs=1e-4), (stage, name)
            # The batch size is free: one image alone gives its own probabilities.
            one = result[stage][f"{name}_one"][0]
            assert one == pytest.approx(expected[0], abs=1e-4), (stage, name)


def test_sidecars_say_how_to_use_each_file(small_run):
    export = small_run / "results/baseline/export"
    for stage in ("head", "finetune"):
        for file in (f"{stage}.onnx", f"{stage}.pt2"):
            sidecar = json.loads((export / f"{file}.json").read_text())
            assert sidecar["file"] == file and sidecar["stage"] == stage
            assert sidecar["classes"] == ["cats", "dogs"] and sidecar["image_size"] == 32
            assert sidecar["mean"] == [0.485, 0.456, 0.406]
            assert sidecar["input"]["shape"] == ["batch", 3, 32, 32]
            assert "sigmoid" in sidecar["probabilities"] and len(sidecar["preprocess"]) == 4
        sidecar = json.loads((export / f"{stage}.onnx.json").read_text())
        assert sidecar["opset"] == ONNX_OPSET and f"opset {ONNX_OPSET}" in sidecar["format"]
        graph = onnx.load(str(export / f"{stage}.onnx"))
        assert [o.version for o in graph.opset_import if o.domain == ""] == [ONNX_OPSET]
        (images,) = graph.graph.input
        batch, *rest = images.type.tensor_type.shape.dim
        assert batch.dim_param and [d.dim_value for d in rest] == [3, 32, 32]
        assert [o.name for o in graph.graph.output] == ["probabilities", "logits"]
    log = Path(small_run / "logs/export/baseline/finetune.log").read_text()
    assert "ONNX probabilities differ from the checkpoint's by" in log
