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
import importlib

from transfer_learning import cli, data, stages
from transfer_learning.settings import FinetuneSettings

# Loaded by name, not imported: training logs change no result, so an edit of tracking.py
# must not count as a change of this stage's code (sources.code_digest reads imports).
tracking = importlib.import_module("transfer_learning.tracking")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head", required=True, help="checkpoint of train_head")
    cli.add_images(parser)
    parser.add_argument("--splits", nargs=2, required=True, metavar=("TRAIN", "VAL"))
    parser.add_argument("--weights-file", type=cli.optional, default=None)
    parser.add_argument("--resume", type=cli.optional, default=None)
    parser.add_argument("--output", required=True)
    parser.add_argument("--history", required=True)
    parser.add_argument("--usage", default=None, help="TSV of GPU figures per pass")
    cli.add_runtime(parser)
    cli.add_settings(parser, FinetuneSettings)
    tracking.add_arguments(parser)
    args = parser.parse_args()
    settings = cli.settings_from_args(args, FinetuneSettings)
    logs = tracking.training_logs(
        args, stage="finetune", settings=settings, output=args.output, resume=args.resume
    )
    with logs:
        stages.finetune(
            settings,
            head_checkpoint=args.head,
            manifest=args.manifest,
            data_root=args.data_root,
            splits=args.splits,
            weights_file=args.weights_file,
            output=args.output,
            history=args.history,
            usage_out=args.usage,
            workers=data.loader_workers(args.threads, args.max_workers),
            resume=args.resume,
            device=args.device,
            observers=logs.observers,
        )
        logs.finish(args.output, args.history)


if __name__ == "__main__":
    cli.run("finetune", main, memory_hint="finetune.batch_size")
