"""The ``augserver`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import numpy as np


def _demo(args: argparse.Namespace) -> int:
    """Run the AugMix kernel on real photos, print samples/s and save a preview grid."""
    from PIL import Image

    from augserver import transforms
    from augserver.augmix import AugMixConfig, augmix_triple, sample_rng

    try:
        import skimage.data
    except ImportError:
        print("augserver demo needs scikit-image (pip install 'augserver[test]')", file=sys.stderr)
        return 2
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]
    cases = [
        ("cifar", 3, [np.asarray(Image.fromarray(p).resize((32, 32))) for p in photos]),
        ("imagenet", 1, photos),
    ]
    rows = []
    for preprocess, severity, sources in cases:
        config = AugMixConfig(severity=severity)
        count = 0
        start = time.perf_counter()
        while time.perf_counter() - start < args.seconds or count < 2:
            rng = sample_rng(args.seed, 0, count)
            image = transforms.preprocess(preprocess, sources[count % len(sources)], rng)
            triple = augmix_triple(image, rng, config)
            count += 1
        elapsed = time.perf_counter() - start
        side = triple[0].shape[0]
        print(
            f"{preprocess:>8} {side}x{side} severity {severity}: "
            f"{count / elapsed:8.1f} triples/s on one core ({count} in {elapsed:.1f} s)"
        )
        rows.append(np.concatenate([np.asarray(Image.fromarray(v).resize((224, 224),
                    Image.NEAREST)) for v in triple], axis=1))
    if args.preview:
        Image.fromarray(np.concatenate(rows, axis=0)).save(args.preview)
        print(f"preview (orig | aug1 | aug2) written to {args.preview}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="augserver", description="Distributed AugMix data loading over ZeroMQ."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the AugMix kernel on built-in photos")
    demo.add_argument("--seconds", type=float, default=2.0, help="time per image size")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--preview", default="augmix_demo.png", help="PNG to write ('' for none)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``augserver`` console script."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
