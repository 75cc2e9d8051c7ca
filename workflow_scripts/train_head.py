#!/usr/bin/env python3
"""Train the classification head on cached features.

Usage: python workflow_scripts/train_head.py --train-features results/features/<key>/train.pt \
    --val-features results/features/<key>/val.pt \
    --settings '{"epochs": 5, "lr": 1e-4, "batch_size": 16, "dropout": 0.2, "seed": 1234}' \
    --output results/baseline/head/model.pt --history results/baseline/head/history.tsv \
    [--resume results/.resume/baseline/head.pt]
"""

import argparse
import importlib

from transfer_learning import cli, stages
from transfer_learning.settings import HeadSettings

# Loaded by name, not imported: training logs change no result, so an edit of tracking.py
# must not count as a change of this stage's code (sources.code_digest reads imports).
tracking = importlib.import_module("transfer_learning.tracking")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-features", required=True)
    parser.add_argument("--val-features", required=True)
    parser.add_argument("--resume", type=cli.optional, default=None)
    parser.add_argument("--output", required=True)
    parser.add_argument("--history", required=True)
    cli.add_runtime(parser)
    cli.add_settings(parser, HeadSettings)
    tracking.add_arguments(parser)
    args = parser.parse_args()
    settings = cli.settings_from_args(args, HeadSettings)
    logs = tracking.training_logs(
        args, stage="head", settings=settings, output=args.output, resume=args.resume
    )
    with logs:
        stages.train_head(
            settings,
            train_features=args.train_features,
            val_features=args.val_features,
            output=args.output,
            history=args.history,
            resume=args.resume,
            device=args.device,
            observers=logs.observers,
        )
        logs.finish(args.output, args.history)


if __name__ == "__main__":
    cli.run("train_head", main, memory_hint="head.batch_size")
