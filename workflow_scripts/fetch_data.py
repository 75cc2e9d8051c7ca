#!/usr/bin/env python3
"""Build the cats/dogs course image tree from the Oxford-IIIT Pet data set.

Usage: python workflow_scripts/fetch_data.py --root data/pets \
    --counts '{"train": {"cats": 1000, "dogs": 1000}, "val": {...}, "test": {...}}' \
    --seed 42 --download-dir downloads [--no-download]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from transfer_learning import fetch

PROG = "fetch_data"


def log(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def parse_counts(text: str) -> dict:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise SystemExit(f"{PROG}: --counts is not valid JSON: {err}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root", required=True, type=Path, help="output tree <root>/<split>/<class>/"
    )
    parser.add_argument(
        "--counts", required=True, help='JSON: {"split": {"cats": N, "dogs": N}, ...}'
    )
    parser.add_argument("--seed", required=True, type=int, help="selection seed")
    parser.add_argument(
        "--download-dir",
        required=True,
        type=Path,
        help="Oxford-IIIT Pet archives go here",
    )
    parser.add_argument(
        "--no-download",
        action="store_true",
        help="use already-extracted files in --download-dir only",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    counts = parse_counts(args.counts)
    try:
        report = fetch.fetch_oxford_pets(
            args.root,
            counts,
            args.seed,
            args.download_dir,
            download=not args.no_download,
            log=log,
        )
    except (fetch.FetchError, ValueError, TypeError, OSError) as err:
        # OSError covers network (URLError) and disk failures.
        raise SystemExit(f"{PROG}: {err}") from None
    written = ", ".join(f"{s}: {json.dumps(c)}" for s, c in report["counts"].items())
    log(f"ok: {report['root']} ({written}); skipped {len(report['skipped'])} undecodable images")


if __name__ == "__main__":
    main()
