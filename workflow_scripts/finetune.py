#!/usr/bin/env python3
"""Fine-tune the last backbone blocks together with the trained head.

Usage: python workflow_scripts/finetune.py --head results/baseline/head/model.pt \
    --manifest results/data/manifest.tsv --data-root data/catsVsDogs --splits train val \
    --weights-file resources/weights/mobilenet_v2-7ebf99e0.pth --epochs 30 --lr 1e-5 \
    --batch-size 16 --unfreeze-blocks none --warmup-epochs 3 --patience 3 --min-delta 1e-3 \
    --seed 1234 --output results/baseline/finetune/model.pt \
    --history results/baseline/finetune/history.tsv
"""

import argparse

from transfer_learning import cli, data, stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head", required=True, help="checkpoint of train_head")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--splits", nargs=2, required=True, metavar=("TRAIN", "VAL"))
    parser.add_argument("--weights-file", type=cli.optional, default=None)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument(
        "--unfreeze-blocks",
        type=lambda t: None if cli.optional(t) is None else int(t),
        default=None,
        help="number of last backbone blocks to train; none: the last quarter",
    )
    parser.add_argument("--warmup-epochs", type=int, default=0)
    parser.add_argument("--warmup-start-factor", type=float, default=0.5)
    parser.add_argument("--patience", type=int, required=True)
    parser.add_argument("--min-delta", type=float, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, default=cli.threads_default())
    parser.add_argument("--max-workers", type=int, default=8)
    parser.add_argument("--resume", type=cli.optional, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", required=True)
    parser.add_argument("--history", required=True)
    args = parser.parse_args()
    stages.finetune(
        head_checkpoint=args.head,
        manifest=args.manifest,
        data_root=args.data_root,
        splits=args.splits,
        weights_file=args.weights_file,
        output=args.output,
        history=args.history,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        unfreeze_blocks=args.unfreeze_blocks,
        warmup_epochs=args.warmup_epochs,
        warmup_start_factor=args.warmup_start_factor,
        patience=args.patience,
        min_delta=args.min_delta,
        seed=args.seed,
        amp=args.amp,
        deterministic=args.deterministic,
        workers=data.loader_workers(args.threads, args.max_workers),
        resume=args.resume,
        device=args.device,
    )


if __name__ == "__main__":
    cli.run("finetune", main)
