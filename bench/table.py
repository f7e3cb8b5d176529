"""End-to-end benchmark table: the kernel per core, the service with 1 and 2 workers, the
PyTorch DataLoader comparator with as many workers, and the ratios, from one run.

    python bench/table.py [--samples 8192] [--batch-size 128] [--seconds 3] [--rounds 2]

Rows (samples/s; one sample = one JSD triple (orig, aug1, aug2) at 32x32, CIFAR
preprocessing, severity 3, real-photo crops from scikit-image):
- kernel, 1 core: augserver's exact (bit-for-bit) kernel in this process, single-threaded,
  against the usual per-image PIL AugMix (``bench/kernel.py``'s comparator); the ratio is the
  per-core speed-up. There is no fast (approximate) mode: the exact kernel met its targets.
- service, W workers (W = 1, 2): ``augserver serve --workers W`` feeding
  ``RemoteAugMixLoader`` over loopback TCP (steady rate over one epoch, warm workers), against
  ``torch.utils.data.DataLoader(num_workers=W)`` running the usual PIL AugMix dataset; the
  last column is the service's rate per worker over the kernel's rate on one core.

Kernel rows are the best of ``--rounds`` interleaved rounds; service rows the best of
``--rounds`` epochs. Everything shares this machine's cores: with W workers the dispatcher and
the training process run beside them.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel import augserver_sample, rate, usual_sample  # noqa: E402
from service import Server, dataloader_rate, epoch_rate, photo_crops  # noqa: E402

from augserver.augmix import AugMixConfig  # noqa: E402
from client.loader import RemoteAugMixLoader  # noqa: E402


def kernel_rates(sources: np.ndarray, seconds: float, rounds: int) -> tuple[float, float]:
    """(augserver, usual PIL) samples/s on one core, best of ``rounds`` interleaved rounds."""
    ours = augserver_sample("cifar", AugMixConfig(severity=3))
    usual = usual_sample("cifar", 3)
    images = list(sources[:256])
    pil_images = [Image.fromarray(s) for s in images]
    ours(images[0], 0)  # compile and warm outside the timing
    usual(pil_images[0], 0)
    best_ours = best_usual = 0.0
    for _ in range(rounds):
        best_ours = max(best_ours, rate(ours, images, seconds))
        best_usual = max(best_usual, rate(usual, pil_images, seconds))
    return best_ours, best_usual


def service_best(config: Path, workers: int, rounds: int) -> float:
    """Best steady samples/s over ``rounds`` epochs through the service (one warm-up epoch)."""
    with Server(config, workers) as server:
        loader = RemoteAugMixLoader(  # batches as delivered: uint8, NHWC memory
            server.address, prefetch=8, timeout=120, normalize=False, channels_last=True
        )
        epoch_rate(loader, 0)
        return max(epoch_rate(loader, epoch)[0] for epoch in range(1, rounds + 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=8192, help="dataset size")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=3.0, help="time per kernel round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (kernel) / epochs (service)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    x, y = photo_crops(args.samples)
    kernel, usual_kernel = kernel_rates(x, args.seconds, args.rounds)
    rows = [("kernel, 1 core (exact)", kernel, usual_kernel, 1.0)]
    with tempfile.TemporaryDirectory(prefix="augserver-table-") as tmp:
        np.savez(Path(tmp) / "photos32.npz", x=x, y=y)
        config = Path(tmp) / "job.yaml"
        config.write_text(
            f"dataset: {{format: npz, path: {Path(tmp) / 'photos32.npz'}}}\n"
            f"preprocess: cifar\nbatch_size: {args.batch_size}\n"
        )
        for workers in (1, 2):
            service = service_best(config, workers, args.rounds)
            usual = dataloader_rate(x, y, workers, args.batch_size)
            rows.append((f"service, {workers} worker{'s' * (workers > 1)}", service, usual,
                         service / workers / kernel))  # fmt: skip

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, torch {torch.__version__}")
    print(f"job: {args.samples} real-photo crops 32x32, CIFAR preprocessing, severity 3, JSD, "
          f"batch {args.batch_size}")  # fmt: skip
    header = f"{'':<24}{'augserver/s':>12}{'usual PIL/s':>13}{'ratio':>8}{'per worker/kernel':>19}"
    print(header)
    print("-" * len(header))
    for label, ours, usual, efficiency in rows:
        print(f"{label:<24}{ours:>12.0f}{usual:>13.0f}{ours / usual:>7.1f}x{efficiency:>18.2f}")


if __name__ == "__main__":
    main()
