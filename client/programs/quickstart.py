"""The main job on a built-in dataset: a dispatcher with local workers feeding a short training
run through ``RemoteAugMixLoader`` and ``jsd_loss``.

    python -m client.programs.quickstart [--workers 2] [--steps 100] [--batch-size 64]

It needs no download: the dataset is scikit-learn's handwritten digits (1797 real 8x8 scans,
shipped with the package), upscaled to 32x32 RGB and written as an ``.npz``. It starts
``augserver serve`` as a subprocess on a free loopback port
(:mod:`client.programs.local_server`), trains a small CNN with the AugMix JSD loss
(:func:`client.programs.train.train`), prints samples/s and the falling loss, and stops
everything it started.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from augserver.status import request_status
from client.loader import RemoteAugMixLoader
from client.programs.digits import digits_npz
from client.programs.local_server import local_server
from client.programs.models import small_cnn
from client.programs.train import job_config, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="local worker processes")
    parser.add_argument("--steps", type=int, default=100, help="training steps")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="augserver-quickstart-") as tmp:
        data = digits_npz(Path(tmp) / "digits.npz")
        job = job_config("npz", data, method="augmix+jsd", batch_size=args.batch_size,
                         preprocess="cifar")
        with local_server(job, args.workers) as address:
            return run_quickstart(address, args.steps)


def run_quickstart(address: str, steps: int) -> int:
    """The quickstart's training run against ``address``; 0 when the loss fell."""
    loader = RemoteAugMixLoader(address, prefetch=6, timeout=120)
    print(
        f"augserver quickstart: digits 32x32, {len(loader)} batches/epoch of "
        f"{loader.config.batch_size}, JSD on, server at {address}"
    )
    torch.manual_seed(0)
    result = train(loader, small_cnn(10), method="augmix+jsd",
                   epochs=math.ceil(steps / len(loader)), max_steps=steps, bar=False,
                   log_every=10)
    losses = result.losses
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    print(f"loss {first:.3f} -> {last:.3f} over {len(losses)} steps")
    counters = request_status(address, 10.0).counters
    shm, tcp = counters.batches_shm, counters.batches_tcp
    path = (f"all {shm} batches through shared memory (workers on this host)" if not tcp else
            f"{shm} batches through shared memory, {tcp} over TCP")
    print(f"data path: {path}")
    return 0 if last < first else 1


if __name__ == "__main__":
    raise SystemExit(main())
