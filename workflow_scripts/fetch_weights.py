#!/usr/bin/env python3
"""Download pretrained torchvision weights, checked against their sha256 prefix.

Usage: python workflow_scripts/fetch_weights.py --backbone mobilenet_v2 \
    --weights DEFAULT --out resources/weights/mobilenet_v2.pth [--url URL]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transfer_learning import fetch

PROG = "fetch_weights"


def log(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backbone", required=True, help="torchvision model name, e.g. mobilenet_v2"
    )
    parser.add_argument(
        "--weights", required=True, help="weights name, e.g. IMAGENET1K_V1 or DEFAULT"
    )
    parser.add_argument("--out", required=True, type=Path, help="where to write the .pth file")
    parser.add_argument("--url", help="download from here instead (mirror; file:// works)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        path = fetch.fetch_weights(args.backbone, args.weights, args.out, url=args.url, log=log)
    except (fetch.FetchError, ValueError, OSError) as err:
        # OSError covers network (URLError) and disk failures.
        raise SystemExit(f"{PROG}: {err}") from None
    log(f"ok: {path}")


if __name__ == "__main__":
    main()
