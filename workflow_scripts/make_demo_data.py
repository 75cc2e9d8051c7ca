#!/usr/bin/env python3
"""Generate the synthetic demo data set (a few dozen small JPEGs per class and split).

Usage: python workflow_scripts/make_demo_data.py --data-root data/demo \
    --counts '{"train": {"circles": 40, "squares": 40}, ...}' --image-size 64 --seed 1234
"""

import argparse
import logging

from transfer_learning import cli
from transfer_learning.demo import make_demo_dataset

PROG = "make_demo_data"


def main() -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--counts", type=cli.json_arg, required=True)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shapes = make_demo_dataset(args.data_root, args.counts, args.image_size, args.seed)
    logging.getLogger(PROG).info("demo data in %s, class shapes %s", args.data_root, shapes)


if __name__ == "__main__":
    cli.run(PROG, main)
