#!/usr/bin/env python3
"""Evaluate one stage's model: metrics, predictions and confusion counts per split.

Usage: python workflow_scripts/evaluate.py --checkpoint results/baseline/finetune/model.pt \
    --manifest results/data/manifest.tsv --data-root data/catsVsDogs --splits val test \
    --settings '{"batch_size": 64}' \
    --metrics results/baseline/eval/finetune/metrics.tsv \
    --predictions results/baseline/eval/finetune/predictions.tsv \
    --confusion results/baseline/eval/finetune/confusion.tsv
"""

import argparse

from transfer_learning import cli, data, stages
from transfer_learning.settings import EvaluateSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    cli.add_images(parser)
    parser.add_argument("--splits", nargs="+", required=True)
    parser.add_argument("--weights-file", type=cli.optional, default=None)
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--predictions", required=True)
    parser.add_argument("--confusion", required=True)
    parser.add_argument("--usage", default=None, help="TSV of GPU figures per pass")
    cli.add_runtime(parser)
    cli.add_settings(parser, EvaluateSettings)
    args = parser.parse_args()
    stages.evaluate(
        cli.settings_from_args(args, EvaluateSettings),
        checkpoint_path=args.checkpoint,
        manifest=args.manifest,
        data_root=args.data_root,
        splits=args.splits,
        metrics_out=args.metrics,
        predictions_out=args.predictions,
        confusion_out=args.confusion,
        usage_out=args.usage,
        weights_file=args.weights_file,
        workers=data.loader_workers(args.threads, args.max_workers),
        device=args.device,
    )


if __name__ == "__main__":
    cli.run("evaluate", main, memory_hint="evaluate.batch_size")
