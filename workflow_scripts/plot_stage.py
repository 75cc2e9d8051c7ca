#!/usr/bin/env python3
"""Plot one stage's evaluation: confusion matrix, ROC curve and most confident mistakes.

Usage: python workflow_scripts/plot_stage.py --experiment baseline --stage finetune \
    --predictions results/baseline/eval/finetune/predictions.tsv \
    --confusion results/baseline/eval/finetune/confusion.tsv \
    --data-root data/catsVsDogs --split test \
    --confusion-matrix results/baseline/plots/finetune_confusion_matrix.png \
    --roc-curve results/baseline/plots/finetune_roc_curve.png \
    --mistakes results/baseline/plots/finetune_mistakes.png
"""

import argparse
import logging

from transfer_learning import cli, io, plots
from transfer_learning.errors import UserError

STAGE_NAMES = {"head": "head", "finetune": "fine-tune"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--stage", required=True)
    parser.add_argument("--predictions", required=True)
    parser.add_argument("--confusion", required=True)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--mistakes-shown", type=int, default=16)
    parser.add_argument("--confusion-matrix", required=True)
    parser.add_argument("--roc-curve", required=True)
    parser.add_argument("--mistakes", required=True)
    args = parser.parse_args()
    title = f"{args.experiment}, {STAGE_NAMES.get(args.stage, args.stage)}"
    predictions = io.read_tsv(args.predictions)
    if not any(r["split"] == args.split for r in predictions):
        raise UserError(f"{args.predictions} has no predictions for split '{args.split}'")
    classes = plots.probability_classes(predictions)
    plots.plot_confusion_matrix(
        args.confusion, args.split, classes, args.confusion_matrix, title=title
    )
    plots.plot_roc_curve(predictions, args.roc_curve, split=args.split, title=title)
    plots.mistakes_gallery(
        predictions,
        args.data_root,
        args.mistakes,
        n=args.mistakes_shown,
        split=args.split,
        title=title,
    )
    logging.getLogger("plot_stage").info(
        "wrote %s, %s and %s", args.confusion_matrix, args.roc_curve, args.mistakes
    )


if __name__ == "__main__":
    cli.run("plot_stage", main)
