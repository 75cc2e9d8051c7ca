#!/usr/bin/env python3
"""Run the frozen backbone over one split once and cache its features.

Usage: python workflow_scripts/extract_features.py --manifest results/data/manifest.tsv \
    --data-root data/catsVsDogs --split train --train-split train \
    --weights-file resources/weights/mobilenet_v2-7ebf99e0.pth \
    --settings '{"backbone": "mobilenet_v2", "weights": "IMAGENET1K_V2", "image_size": 224,
                 "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                 "augmented_views": 1, "seed": 1234, "batch_size": 64}' \
    --output results/features/<key>/train.pt
"""

import argparse

from transfer_learning import cli, data, stages
from transfer_learning.settings import FeatureSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_images(parser)
    parser.add_argument("--split", required=True)
    parser.add_argument(
        "--train-split",
        default="train",
        help="the split that gets augmented views and calibrates random-init BatchNorm",
    )
    parser.add_argument("--weights-file", type=cli.optional, default=None)
    parser.add_argument("--output", required=True)
    parser.add_argument("--usage", default=None, help="TSV of GPU figures of the pass")
    cli.add_runtime(parser)
    cli.add_settings(parser, FeatureSettings)
    args = parser.parse_args()
    stages.extract_features(
        cli.settings_from_args(args, FeatureSettings),
        manifest=args.manifest,
        data_root=args.data_root,
        split=args.split,
        train_split=args.train_split,
        output=args.output,
        usage_out=args.usage,
        weights_file=args.weights_file,
        workers=data.loader_workers(args.threads, args.max_workers),
        device=args.device,
    )


if __name__ == "__main__":
    cli.run("extract_features", main, memory_hint="features.batch_size")
