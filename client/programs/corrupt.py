"""``python -m client.programs.corrupt``: make the corrupted sets of an npz, or preview them.

    python -m client.programs.corrupt --npz test.npz --cache cache/ [--preview grid.png]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from client.robustness.cache import check_selection, fingerprint, iter_sets
from client.robustness.corruptions import check_images, check_params, preview_grid
from client.robustness.tables import CORRUPTIONS, PARAMS, SEVERITIES


def _load_npz_images(path: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as data:
        if "x" not in data:
            raise ValueError(f"{path}: no array 'x' (NHWC uint8) in the npz")
        return check_images(data["x"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m client.programs.corrupt",
        description="Make CIFAR-10-C / ImageNet-C style corrupted sets of an npz's images.",
    )
    parser.add_argument("--npz", required=True, help="npz holding x: N x H x W x 3 uint8")
    parser.add_argument("--cache", help="cache directory to fill")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--params",
        choices=PARAMS,
        default=None,
        help="parameter table (default: cifar if the image side is <= 64)",
    )
    parser.add_argument(
        "--names",
        nargs="+",
        default=list(CORRUPTIONS),
        metavar="NAME",
        help=f"corruptions (default: all 15: {' '.join(CORRUPTIONS)})",
    )
    parser.add_argument(
        "--severities",
        nargs="+",
        type=int,
        default=list(SEVERITIES),
        metavar="S",
        help="severities (default: 1 2 3 4 5)",
    )
    parser.add_argument(
        "--preview",
        metavar="OUT.png",
        help="also write a grid of one image under every corruption/severity",
    )
    parser.add_argument("--preview-index", type=int, default=0, help="image shown by --preview")
    args = parser.parse_args(argv)  # fmt: skip
    if args.cache is None and args.preview is None:
        parser.error("give --cache DIR and/or --preview OUT.png")
    try:
        images = _load_npz_images(args.npz)
        names, severities = check_selection(args.names, args.severities)
        params = check_params(args.params, images.shape[1], images.shape[2])
        if not 0 <= args.preview_index < len(images):
            raise ValueError(f"--preview-index must be in 0..{len(images) - 1}")
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n, h, w = images.shape[:3]
    if args.cache is not None:
        print(f"{n} images {h}x{w}, table {params}, seed {args.seed}, "
              f"{len(names) * len(severities)} sets -> {args.cache}", flush=True)  # fmt: skip
        start = time.perf_counter()
        sets = iter_sets(images, args.cache, args.seed, names, severities, params)
        made, last = 0, start
        for name, severity, _arr, hit in sets:
            now = time.perf_counter()
            t, last = now - last, now  # this set's time, not the total so far
            made += not hit
            print(f"  {name}-{severity}: {'cached' if hit else 'made'} ({t:.1f} s)", flush=True)
        where = Path(args.cache) / fingerprint(images, args.seed, params)
        print(f"{made} made, {len(names) * len(severities) - made} from the cache, in {where} "
              f"({time.perf_counter() - start:.1f} s)")  # fmt: skip
    if args.preview is not None:
        grid = preview_grid(
            images[args.preview_index], index=args.preview_index, seed=args.seed,
            params=params, names=names, severities=severities,
        )  # fmt: skip
        grid.save(args.preview)
        print(f"preview of image {args.preview_index} -> {args.preview}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
