#!/usr/bin/env python3
"""Train the classification head on cached features.

Usage: python workflow_scripts/train_head.py --train-features results/features/<key>/train.pt \
    --val-features results/features/<key>/val.pt --epochs 5 --lr 1e-4 --batch-size 16 \
    --dropout 0.2 --seed 1234 --output results/baseline/head/model.pt \
    --history results/baseline/head/history.tsv [--resume results/.resume/baseline/head.pt]
"""

import argparse

from transfer_learning import cli, stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-features", required=True)
    parser.add_argument("--val-features", required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--dropout", type=float, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--resume", type=cli.optional, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", required=True)
    parser.add_argument("--history", required=True)
    args = parser.parse_args()
    stages.train_head(
        train_features=args.train_features,
        val_features=args.val_features,
        output=args.output,
        history=args.history,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        dropout=args.dropout,
        seed=args.seed,
        resume=args.resume,
        device=args.device,
        settings={"seed": args.seed},
    )


if __name__ == "__main__":
    cli.run("train_head", main)
