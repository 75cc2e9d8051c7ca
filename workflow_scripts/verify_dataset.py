#!/usr/bin/env python3
"""Check the image data against the config; write the manifest and the counts.

Usage: python workflow_scripts/verify_dataset.py --data-root data/catsVsDogs \
    --settings '{"splits": ["train", "val", "test"],
                 "expected_counts": {"train": {"cats": 1000, "dogs": 1000}, ...}}' \
    --manifest results/data/manifest.tsv --counts results/data/counts.tsv
"""

import argparse
import logging

from transfer_learning import cli, verify
from transfer_learning.errors import UserError
from transfer_learning.io import atomic_path, write_tsv
from transfer_learning.settings import DataSettings

log = logging.getLogger("verify_dataset")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--counts", required=True)
    parser.add_argument("--threads", type=int, default=cli.threads_default())
    cli.add_settings(parser, DataSettings)
    args = parser.parse_args()
    settings = cli.settings_from_args(args, DataSettings)

    # The manifest is written while the images are checked (a million rows never sit in
    # memory) to a temporary file that becomes the manifest only if nothing is wrong.
    with atomic_path(args.manifest) as manifest:
        report = verify.verify_dataset(
            args.data_root,
            settings.splits,
            settings.expected_counts,
            settings.on_count_mismatch,
            args.threads,
            duplicates=settings.duplicates,
            near_duplicate_distance=settings.near_duplicate_distance,
            manifest=manifest,
        )
        for path in report.skipped:
            log.info("skipped hidden file %s", path)
        for warning in report.warnings:
            log.warning("%s", warning)
        for row in report.counts:
            log.info("%s/%s: %s images (expected %s) %s", *row.values())
        if not report.ok:
            raise UserError(verify.format_problems(report, args.data_root))
        write_tsv(args.counts, report.counts, ["split", "class", "found", "expected", "status"])
    log.info("%d images verified under %s", report.images, args.data_root)


if __name__ == "__main__":
    cli.run("verify_dataset", main)
