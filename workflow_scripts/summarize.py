#!/usr/bin/env python3
"""Collect every experiment's test metrics and training time into one table.

Usage: python workflow_scripts/summarize.py --runs '[{"experiment": "baseline",
    "stage": "head", "metrics": "results/baseline/eval/head/metrics.tsv",
    "checkpoint": "results/baseline/head/model.pt", "overrides": {}}, ...]' \
    --sort-by test_accuracy --output results/summary.tsv
"""

import argparse

from transfer_learning import cli, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=cli.json_arg, required=True)
    parser.add_argument("--test-split", default="test")
    parser.add_argument("--sort-by", default="test_accuracy")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    rows = [summary.summary_row(run, args.test_split) for run in args.runs]
    summary.summarize(rows, args.output, args.sort_by)


if __name__ == "__main__":
    cli.run("summarize", main)
