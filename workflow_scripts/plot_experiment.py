#!/usr/bin/env python3
"""Plot one experiment's training: both stages' learning curves and their metrics table.

Usage: python workflow_scripts/plot_experiment.py --experiment baseline \
    --head-history results/baseline/head/history.tsv \
    --finetune-history results/baseline/finetune/history.tsv \
    --head-checkpoint results/baseline/head/model.pt \
    --finetune-checkpoint results/baseline/finetune/model.pt \
    --head-metrics results/baseline/eval/head/metrics.tsv \
    --finetune-metrics results/baseline/eval/finetune/metrics.tsv \
    --learning-curves results/baseline/plots/learning_curves.png \
    --metrics-table results/baseline/plots/metrics.html
"""

import argparse
import logging

from transfer_learning import checkpoint as checkpoint_file
from transfer_learning import cli, plots


def best_epoch(checkpoint):
    """The epoch whose weights a stage kept, or None to take the lowest validation loss."""
    return checkpoint_file.load_stage(checkpoint).best_epoch if checkpoint else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--head-history", required=True)
    parser.add_argument("--finetune-history", type=cli.optional, default=None)
    parser.add_argument("--head-checkpoint", type=cli.optional, default=None)
    parser.add_argument("--finetune-checkpoint", type=cli.optional, default=None)
    parser.add_argument("--head-metrics", required=True)
    parser.add_argument("--finetune-metrics", type=cli.optional, default=None)
    parser.add_argument("--learning-curves", required=True)
    parser.add_argument("--metrics-table", required=True)
    args = parser.parse_args()
    best = {
        "head": best_epoch(args.head_checkpoint),
        "finetune": best_epoch(args.finetune_checkpoint),
    }
    plots.learning_curves(
        args.head_history,
        args.finetune_history,
        args.learning_curves,
        best,
        args.experiment,
    )
    stage_metrics = {"head": args.head_metrics}
    if args.finetune_metrics:
        stage_metrics["finetune"] = args.finetune_metrics
    plots.metrics_table(stage_metrics, args.metrics_table, f"Metrics of {args.experiment}")
    logging.getLogger("plot_experiment").info(
        "wrote %s and %s", args.learning_curves, args.metrics_table
    )


if __name__ == "__main__":
    cli.run("plot_experiment", main)
