"""The main job on a built-in dataset: a dispatcher with local workers feeding a short training
run through ``RemoteAugMixLoader`` and ``jsd_loss``.

    python -m client.demo [--workers 2] [--steps 100] [--batch-size 64]

It needs no download: the dataset is scikit-learn's handwritten digits (1797 real 8x8 scans,
shipped with the package), upscaled to 32x32 RGB and written as an ``.npz``. It starts
``augserver serve`` as a subprocess on a free loopback port, trains a small CNN with the AugMix
JSD loss, prints samples/s and the falling loss, and stops everything it started.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from client.loader import RemoteAugMixLoader
from client.loss import jsd_loss, split_views


def digits_npz(path: Path) -> Path:
    """scikit-learn's digits as 32x32 RGB uint8 images in an ``.npz`` (x, y)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(g).resize((32, 32), Image.BILINEAR)) for g in grey])
    np.savez(path, x=np.repeat(big[..., None], 3, axis=3), y=digits.target.astype(np.int64))
    return path


def small_cnn(num_classes: int = 10) -> nn.Module:
    """A small CNN for 32x32 inputs that trains in seconds on a CPU."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes),
    )  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="local worker processes")
    parser.add_argument("--steps", type=int, default=100, help="training steps")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory(prefix="augserver-demo-") as tmp:
        data = digits_npz(Path(tmp) / "digits.npz")
        config = Path(tmp) / "augserver.yaml"
        config.write_text(
            f"dataset: {{format: npz, path: {data}}}\n"
            "preprocess: cifar\n"
            f"batch_size: {args.batch_size}\n"
        )
        address = f"tcp://127.0.0.1:{free_port()}"
        server = subprocess.Popen(
            [sys.executable, "-m", "augserver", "serve", "--config", str(config),
             "--bind", address, "--workers", str(args.workers), "--log-level", "WARNING"]
        )  # fmt: skip
        try:
            return run_demo(address, args.steps)
        finally:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def train(loader: RemoteAugMixLoader, model: nn.Module, steps: int) -> list[float]:
    """Train ``model`` for ``steps`` steps on ``loader`` with the JSD loss (SGD, nesterov);
    print samples/s and the loss every 10 steps; return every step's loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    step = epoch = samples = 0
    start = window_start = time.perf_counter()
    losses: list[float] = []
    while step < steps:
        loader.set_epoch(epoch)
        for batch in loader:
            logits = model(batch.concat())
            loss = jsd_loss(*split_views(logits), batch.target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            samples += len(batch)
            step += 1
            if step % 10 == 0 or step == steps:
                elapsed = time.perf_counter() - window_start
                print(
                    f"step {step:4d}  epoch {epoch}  loss {np.mean(losses[-10:]):.3f}  "
                    f"{samples / (time.perf_counter() - start):7.1f} samples/s "
                    f"(last 10 steps {elapsed:.2f} s)",
                    flush=True,
                )
                window_start = time.perf_counter()
            if step >= steps:
                break
        epoch += 1
    return losses


def run_demo(address: str, steps: int) -> int:
    """The demo's training run against ``address``; 0 when the loss fell."""
    loader = RemoteAugMixLoader(address, prefetch=6, timeout=120)
    print(
        f"augserver demo: digits 32x32, {len(loader)} batches/epoch of "
        f"{loader.config.batch_size}, JSD on, server at {address}"
    )
    losses = train(loader, small_cnn(10), steps)
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    print(f"loss {first:.3f} -> {last:.3f} over {len(losses)} steps")
    return 0 if last < first else 1


if __name__ == "__main__":
    raise SystemExit(main())
