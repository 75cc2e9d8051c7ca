#!/usr/bin/env python3
"""Build the cats/dogs course image tree from the Oxford-IIIT Pet data set.

Usage: python workflow_scripts/fetch_data.py --data-root data/pets \
    --counts '{"train": {"cats": 1000, "dogs": 1000}, "val": {...}, "test": {...}}' \
    --seed 42 --download-dir downloads [--no-download]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from transfer_learning import cli, fetch

PROG = "fetch_data"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-root", required=True, type=Path, help="the tree <data-root>/<split>/<class>/"
    )
    parser.add_argument(
        "--counts",
        required=True,
        type=cli.json_arg,
        help='JSON: {"split": {"cats": N, "dogs": N}, ...}',
    )
    parser.add_argument("--seed", required=True, type=int, help="selection seed")
    parser.add_argument(
        "--download-dir", required=True, type=Path, help="Oxford-IIIT Pet archives go here"
    )
    parser.add_argument(
        "--no-download",
        action="store_true",
        help="use already-extracted files in --download-dir only",
    )
    args = parser.parse_args(argv)
    report = fetch.fetch_oxford_pets(
        args.data_root, args.counts, args.seed, args.download_dir, download=not args.no_download
    )
    written = ", ".join(f"{s}: {json.dumps(c)}" for s, c in report["counts"].items())
    logging.getLogger(PROG).info(
        "%s: ok: %s (%s); skipped %d undecodable images",
        PROG,
        report["root"],
        written,
        len(report["skipped"]),
    )


if __name__ == "__main__":
    cli.run(PROG, main)
