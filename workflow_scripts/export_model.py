#!/usr/bin/env python3
"""Export one stage's model as ONNX and as a torch.export program, each with a JSON sidecar.

Usage: python workflow_scripts/export_model.py --checkpoint results/baseline/finetune/model.pt \
    --experiment baseline --onnx results/baseline/export/finetune.onnx \
    --program results/baseline/export/finetune.pt2 \
    [--weights-file resources/weights/mobilenet_v2-7ebf99e0.pth]
Sidecars go beside each file (<file>.json) unless --onnx-sidecar/--program-sidecar say
otherwise. A head checkpoint of pretrained weights needs --weights-file.
"""

import argparse

from transfer_learning import cli
from transfer_learning.export import export_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="model.pt of train_head or finetune")
    parser.add_argument("--weights-file", type=cli.optional, default=None)
    parser.add_argument("--experiment", default="", help="recorded in the sidecars")
    parser.add_argument("--onnx", required=True)
    parser.add_argument("--onnx-sidecar", default=None)
    parser.add_argument("--program", required=True, help="the torch.export file (.pt2)")
    parser.add_argument("--program-sidecar", default=None)
    args = parser.parse_args()
    export_stage(
        checkpoint_path=args.checkpoint,
        weights_file=args.weights_file,
        experiment=args.experiment,
        onnx_out=args.onnx,
        onnx_sidecar=args.onnx_sidecar or f"{args.onnx}.json",
        program_out=args.program,
        program_sidecar=args.program_sidecar or f"{args.program}.json",
    )


if __name__ == "__main__":
    cli.run("export_model", main)
