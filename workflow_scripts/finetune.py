#!/usr/bin/env python3
"""Fine-tune the last backbone blocks together with the trained head.

Usage: python workflow_scripts/finetune.py --head results/baseline/head/model.pt \
    --manifest results/data/manifest.tsv --data-root data/catsVsDogs --splits train val \
    --weights-file resources/weights/mobilenet_v2-7ebf99e0.pth \
    --settings results/baseline/finetune/settings.json --lr 1e-4 \
    --output results/baseline/finetune/model.pt \
    --history results/baseline/finetune/history.tsv
(`--settings` takes the JSON object itself or a file holding it; flags override fields.)
"""

import argparse

from transfer_learning import cli, data, stages
from transfer_learning.settings import FinetuneSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head", required=True, help="checkpoint of train_head")
    cli.add_images(parser)
    parser.add_argument("--splits", nargs=2, required=True, metavar=("TRAIN", "VAL"))
    parser.add_argument("--weights-file", type=cli.optional, default=None)
    parser.add_argument("--resume", type=cli.optional, default=None)
    parser.add_argument("--output", required=True)
    parser.add_argument("--history", required=True)
    cli.add_runtime(parser)
    cli.add_settings(parser, FinetuneSettings)
    args = parser.parse_args()
    stages.finetune(
        cli.settings_from_args(args, FinetuneSettings),
        head_checkpoint=args.head,
        manifest=args.manifest,
        data_root=args.data_root,
        splits=args.splits,
        weights_file=args.weights_file,
        output=args.output,
        history=args.history,
        workers=data.loader_workers(args.threads, args.max_workers),
        resume=args.resume,
        device=args.device,
    )


if __name__ == "__main__":
    cli.run("finetune", main, memory_hint="finetune.batch_size")
