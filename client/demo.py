"""The main job on a built-in dataset: a dispatcher with local workers feeding a short training
run through ``RemoteAugMixLoader`` and ``jsd_loss``.

    python -m client.demo [--workers 2] [--steps 100] [--batch-size 64]

It needs no download: the dataset is scikit-learn's handwritten digits (1797 real 8x8 scans,
shipped with the package), upscaled to 32x32 RGB and written as an ``.npz``. It starts
``augserver serve`` as a subprocess on a free loopback port (``client.local_server``), trains a
small CNN with the AugMix JSD loss (``client.train.train``), prints samples/s and the falling
loss, and stops everything it started.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from client.loader import RemoteAugMixLoader
from client.local_server import local_server
from client.models import small_cnn
from client.train import job_config, train


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as 32x32 RGB uint8 images (N, 32, 32, 3) and int64 labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(g).resize((32, 32), Image.BILINEAR)) for g in grey])
    return np.repeat(big[..., None], 3, axis=3), digits.target.astype(np.int64)


def digits_npz(path: Path) -> Path:
    """scikit-learn's digits (:func:`digits_arrays`) in an ``.npz`` (x, y)."""
    x, y = digits_arrays()
    np.savez(path, x=x, y=y)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="local worker processes")
    parser.add_argument("--steps", type=int, default=100, help="training steps")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="augserver-demo-") as tmp:
        data = digits_npz(Path(tmp) / "digits.npz")
        job = job_config("npz", data, method="augmix+jsd", batch_size=args.batch_size,
                         preprocess="cifar")
        with local_server(job, args.workers) as address:
            return run_demo(address, args.steps)


def run_demo(address: str, steps: int) -> int:
    """The demo's training run against ``address``; 0 when the loss fell."""
    loader = RemoteAugMixLoader(address, prefetch=6, timeout=120)
    print(
        f"augserver demo: digits 32x32, {len(loader)} batches/epoch of "
        f"{loader.config.batch_size}, JSD on, server at {address}"
    )
    torch.manual_seed(0)
    result = train(loader, small_cnn(10), method="augmix+jsd",
                   epochs=math.ceil(steps / len(loader)), max_steps=steps, bar=False,
                   log_every=10)
    losses = result.losses
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    print(f"loss {first:.3f} -> {last:.3f} over {len(losses)} steps")
    return 0 if last < first else 1


if __name__ == "__main__":
    raise SystemExit(main())
