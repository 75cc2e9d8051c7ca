#!/usr/bin/env python3
"""Download pretrained torchvision weights, checked against their sha256 prefix.

Usage: python workflow_scripts/fetch_weights.py --backbone mobilenet_v2 \
    --weights DEFAULT --output resources/weights/mobilenet_v2-7ebf99e0.pth [--url URL]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from transfer_learning import cli, fetch

PROG = "fetch_weights"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", required=True, help="torchvision model, e.g. mobilenet_v2")
    parser.add_argument("--weights", required=True, help="e.g. IMAGENET1K_V1 or DEFAULT")
    parser.add_argument("--output", required=True, type=Path, help="the .pth file to write")
    parser.add_argument("--url", help="download from here instead (mirror; file:// works)")
    args = parser.parse_args(argv)
    path = fetch.fetch_weights(args.backbone, args.weights, args.output, url=args.url)
    logging.getLogger(PROG).info("%s: ok: %s", PROG, path)


if __name__ == "__main__":
    cli.run(PROG, main)
