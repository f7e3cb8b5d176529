"""``python -m client.programs.evaluate``: a checkpoint's clean error, mCE and calibration.

    python -m client.programs.evaluate --checkpoint ckpt.pt --test test.npz --cache cache/ \\
        [--json out.json] [--plot out.png]
    python -m client.programs.evaluate --checkpoint ckpt.pt --test cifar10:DIR --cache cache/
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

from augserver import preprocessing
from augserver.errors import DatasetError
from client.checkpoint import load_checkpoint
from client.programs.models import build_model
from client.robustness.evaluation import (
    evaluate,
    format_table,
    load_test_set,
    plot_error_vs_severity,
    write_json,
)
from client.robustness.metrics import alexnet_baseline
from client.robustness.tables import CORRUPTIONS, SEVERITIES


def load_checkpoint_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model on ``device``, checkpoint dict) from a :mod:`client.programs.train` checkpoint:
    a dict with "model" (state_dict), "model_name", "num_classes", "image_size" (32 when
    absent: older checkpoints), "mean" and "std"."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: not a checkpoint dict")
    missing = [k for k in ("model", "model_name", "num_classes") if k not in ckpt]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {', '.join(missing)}")
    model = build_model(ckpt["model_name"], int(ckpt["num_classes"]),
                        int(ckpt.get("image_size", 32)))
    model.load_state_dict(ckpt["model"])
    return model.to(device), ckpt


def check_labels(y: np.ndarray, num_classes: int, test: str, checkpoint: str) -> None:
    """ValueError unless every label of the test set is one of the model's classes."""
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{test} has labels {int(y.min())}..{int(y.max())} but the model in "
                         f"{checkpoint} has {num_classes} outputs (num_classes): not the data "
                         "it was trained for")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m client.programs.evaluate",
        description="Clean error, corruption error (mCE) and RMS calibration of a checkpoint.",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint from client.programs.train")
    parser.add_argument("--test", "--test-npz", dest="test", required=True, metavar="SOURCE",
                        help="an npz with x (NHWC uint8) and y, or FORMAT:PATH of a dataset's "
                             "test split (cifar10:DIR, imagefolder:DIR, ...)")
    parser.add_argument("--preprocess", choices=preprocessing.NAMES, default=None,
                        help="test-time view for FORMAT:PATH [the checkpoint's job, else cifar "
                             "for CIFAR and imagenet otherwise]")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate a seeded random subset of this many test samples")
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--cache", help="cache directory for corrupted sets (PNGs, lossless)")
    cache.add_argument("--no-cache", action="store_true",
                       help="make each set, evaluate it and drop it: no disk, one set in memory")
    parser.add_argument("--json", help="write the result as JSON here")
    parser.add_argument("--plot", help="write error vs severity as PNG here (needs matplotlib)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="corruption seed")
    parser.add_argument(
        "--params",
        choices=("cifar", "imagenet"),
        default=None,
        help="corruption table (default: cifar if the image side is <= 64)",
    )
    parser.add_argument("--names", nargs="+", default=list(CORRUPTIONS), metavar="NAME")
    parser.add_argument("--severities", nargs="+", type=int, default=list(SEVERITIES), metavar="S")
    parser.add_argument(
        "--method",
        help="row name in the table (default: the checkpoint's 'method' entry, else its file name)",
    )
    parser.add_argument(
        "--alexnet-baseline",
        action="store_true",
        help="also report ImageNet-C's AlexNet-normalised mCE",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar (shown by default)")
    args = parser.parse_args(argv)  # fmt: skip
    if args.cache is None and not args.no_cache:
        parser.error("pass --cache DIR (sets kept as PNGs) or --no-cache (made and dropped)")
    try:
        model, ckpt = load_checkpoint_model(args.checkpoint, args.device)
        x, y = load_test_set(args.test, args.preprocess or ckpt.get("preprocess"), args.limit,
                             ckpt.get("image_size"))
        check_labels(y, int(ckpt["num_classes"]), args.test, args.checkpoint)
    except (OSError, ValueError, RuntimeError, KeyError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    side = max(x.shape[1:3]) if x.ndim == 4 else 0
    fallback = preprocessing.for_images(side, side)
    mean = tuple(ckpt.get("mean", fallback.mean))
    std = tuple(ckpt.get("std", fallback.std))
    method = args.method or str(ckpt.get("method", Path(args.checkpoint).stem))
    result = evaluate(
        model, x, y, mean=mean, std=std, cache_dir=args.cache, device=args.device,
        batch_size=args.batch_size, seed=args.seed, names=args.names,
        severities=args.severities, params=args.params, progress=args.progress,
        baseline=alexnet_baseline() if args.alexnet_baseline else None,
    )  # fmt: skip
    print(format_table({method: result}))
    if args.json:
        record = {"checkpoint": str(Path(args.checkpoint).resolve()), "method": method,
                  "job": {"test": args.test, "limit": args.limit, "seed": args.seed,
                          "params": args.params, "names": args.names,
                          "severities": args.severities, "image_size": int(x.shape[1]),
                          "training": ckpt.get("args")},
                  **result}
        write_json(record, args.json)
        print(f"results -> {args.json}")
    if args.plot:
        title = f"{method} ({Path(args.checkpoint).name} on {args.test})"
        if plot_error_vs_severity({method: result}, args.plot, title):
            print(f"plot -> {args.plot}")
        else:
            print("no plot: matplotlib is not installed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
