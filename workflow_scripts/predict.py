#!/usr/bin/env python3
"""Classify every image under a folder (any layout, any depth) with one stage's model.

Usage: python workflow_scripts/predict.py --checkpoint results/baseline/finetune/model.pt \
    --images my_photos/ --output results/baseline/predict/finetune.tsv \
    [--weights-file resources/weights/mobilenet_v2-7ebf99e0.pth] [--batch-size 64]
One row per readable image: its path relative to the folder, the predicted class, its
probability and one p_<class> column per class. Unreadable files are skipped, each with a
warning line in the log. A head checkpoint of pretrained weights needs --weights-file.
"""

import argparse

from transfer_learning import cli, data
from transfer_learning.predict import predict_folder
from transfer_learning.settings import EvaluateSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="model.pt of train_head or finetune")
    parser.add_argument("--images", required=True, help="folder of images to classify")
    parser.add_argument("--weights-file", type=cli.optional, default=None)
    parser.add_argument("--output", required=True, help="TSV of predictions")
    parser.add_argument("--usage", default=None, help="TSV of GPU figures of the pass")
    cli.add_runtime(parser)
    cli.add_settings(parser, EvaluateSettings)
    args = parser.parse_args()
    settings = cli.settings_from_args(args, EvaluateSettings)
    predict_folder(
        checkpoint_path=args.checkpoint,
        images=args.images,
        output=args.output,
        batch_size=settings.batch_size,
        weights_file=args.weights_file,
        workers=data.loader_workers(args.threads, args.max_workers),
        device=args.device,
        usage_out=args.usage,
    )


if __name__ == "__main__":
    cli.run("predict", main, memory_hint="evaluate.batch_size")
