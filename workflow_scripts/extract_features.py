#!/usr/bin/env python3
"""Run the frozen backbone over one split once and cache its features.

Usage: python workflow_scripts/extract_features.py --manifest results/data/manifest.tsv \
    --data-root data/catsVsDogs --split train --backbone mobilenet_v2 \
    --weights DEFAULT --weights-file resources/weights/mobilenet_v2-7ebf99e0.pth \
    --image-size 224 --mean 0.485 0.456 0.406 --std 0.229 0.224 0.225 \
    --augmented-views 1 --seed 1234 --output results/features/<key>/train.pt
"""

import argparse

from transfer_learning import cli, data, stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--split", required=True)
    parser.add_argument(
        "--train-split", default="train", help="calibrates random-init BatchNorm statistics"
    )
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--weights", type=cli.optional, default=None, help="identity, recorded")
    parser.add_argument("--weights-file", type=cli.optional, default=None)
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--mean", type=float, nargs=3, required=True)
    parser.add_argument("--std", type=float, nargs=3, required=True)
    parser.add_argument("--augmented-views", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=cli.threads_default())
    parser.add_argument("--max-workers", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    stages.extract_features(
        manifest=args.manifest,
        data_root=args.data_root,
        split=args.split,
        train_split=args.train_split,
        output=args.output,
        backbone=args.backbone,
        weights=args.weights,
        weights_file=args.weights_file,
        image_size=args.image_size,
        mean=args.mean,
        std=args.std,
        augmented_views=args.augmented_views,
        seed=args.seed,
        batch_size=args.batch_size,
        workers=data.loader_workers(args.threads, args.max_workers),
        device=args.device,
    )


if __name__ == "__main__":
    cli.run("extract_features", main)
