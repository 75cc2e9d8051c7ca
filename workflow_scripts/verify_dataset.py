#!/usr/bin/env python3
"""Check the image data against the config; write the manifest and the counts.

Usage: python workflow_scripts/verify_dataset.py --root data/catsVsDogs \
    --splits train val test --expected-counts '{"train": {"cats": 1000, ...}}' \
    --manifest results/data/manifest.tsv --counts results/data/counts.tsv
"""

import argparse
import logging

from transfer_learning import cli, verify
from transfer_learning.data import MANIFEST_COLUMNS
from transfer_learning.io import write_tsv

log = logging.getLogger("verify_dataset")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--splits", nargs="+", required=True)
    parser.add_argument("--expected-counts", type=cli.json_arg, default=None)
    parser.add_argument("--on-count-mismatch", choices=["error", "warn"], default="error")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--counts", required=True)
    parser.add_argument("--threads", type=int, default=cli.threads_default())
    args = parser.parse_args()

    report = verify.verify_dataset(
        args.root, args.splits, args.expected_counts, args.on_count_mismatch, args.threads
    )
    for path in report.skipped:
        log.info("skipped hidden file %s", path)
    for warning in report.warnings:
        log.warning("%s", warning)
    for row in report.counts:
        log.info("%s/%s: %s images (expected %s) %s", *row.values())
    if not report.ok:
        raise ValueError(verify.format_problems(report, args.root))
    write_tsv(args.counts, report.counts, ["split", "class", "found", "expected", "status"])
    write_tsv(args.manifest, report.manifest, MANIFEST_COLUMNS)
    log.info("%d images verified under %s", len(report.manifest), args.root)


if __name__ == "__main__":
    cli.run("verify_dataset", main)
