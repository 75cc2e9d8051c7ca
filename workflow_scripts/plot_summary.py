#!/usr/bin/env python3
"""Compare all experiments: a bar chart of their test metrics and the summary as a table.

Usage: python workflow_scripts/plot_summary.py --summary results/summary.tsv \
    --chart results/plots/experiments.png --table results/plots/summary.html
"""

import argparse
import logging

from transfer_learning import cli, io, plots
from transfer_learning.errors import UserError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary", required=True)
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=["test_accuracy", "test_macro_f1"],
        help="summary columns to chart, one panel each",
    )
    parser.add_argument("--chart", required=True)
    parser.add_argument("--table", required=True)
    args = parser.parse_args()
    rows = io.read_tsv(args.summary)
    if not rows:
        raise UserError(f"{args.summary} has no runs")
    missing = [m for m in args.metrics if m not in rows[0]]
    if missing:
        raise UserError(f"{args.summary} has no column {', '.join(missing)}")
    plots.compare_experiments(rows, args.chart, args.metrics)
    plots.summary_table(rows, args.table, "All experiments on the test split")
    logging.getLogger("plot_summary").info("wrote %s and %s", args.chart, args.table)


if __name__ == "__main__":
    cli.run("plot_summary", main)
