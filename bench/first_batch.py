"""Time to the first batch from `augserver serve --workers 2` start, warm and with an empty
numba cache (as after a plain `pip install` into an environment without augserver's cache).

    python bench/first_batch.py [--workers 2] [--rounds 3]

Each round starts `augserver serve` with 2 local workers on a free loopback port and a job of
32x32 images (CIFAR preprocessing, JSD, batch 128), times from just before the process starts to
the first batch in `RemoteAugMixLoader`, then stops it. "warm" uses the cache this checkout has
(`scripts/setup.sh` fills it); "empty cache" points NUMBA_CACHE_DIR at a new empty folder.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from client.loader import RemoteAugMixLoader
from client.programs.local_server import free_port

REPO = Path(__file__).resolve().parents[1]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def first_batch_seconds(config: Path, workers: int, env: dict[str, str]) -> tuple[float, float]:
    """Seconds from `augserver serve` start to the first batch a loader receives, and the CPU
    seconds the dispatcher and its workers used in all (from start to stop)."""
    address = f"tcp://127.0.0.1:{free_port()}"
    cpu = children_cpu()
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "augserver", "serve", "--config", str(config), "--bind", address,
         "--workers", str(workers), "--log-level", "WARNING"],
        cwd=REPO, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        loader = RemoteAugMixLoader(address, timeout=300)
        next(iter(loader))
        elapsed = time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(30)
    return elapsed, children_cpu() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="augserver-first-batch-") as tmp:
        rng = np.random.default_rng(0)
        np.savez(Path(tmp) / "d.npz", x=rng.integers(0, 256, (1024, 32, 32, 3), np.uint8),
                 y=np.arange(1024) % 10)
        config = Path(tmp) / "job.yaml"
        config.write_text(f"dataset: {{format: npz, path: {Path(tmp) / 'd.npz'}}}\n"
                          "preprocess: cifar\nbatch_size: 128\n")
        warm, cold = [], []
        for i in range(args.rounds):  # interleaved
            warm.append(first_batch_seconds(config, args.workers, dict(os.environ)))
            empty = {**os.environ, "NUMBA_CACHE_DIR": str(Path(tmp) / f"numba-{i}")}
            cold.append(first_batch_seconds(config, args.workers, empty))
        print(f"time to first batch from serve start, {args.workers} local workers, "
              f"{os.cpu_count()} cores (median of {args.rounds}; all rounds in brackets), and the "
              "CPU seconds serve and its workers used from start to stop:")
        for name, values in (("warm cache", warm), ("empty cache", cold)):
            rounds = ", ".join(f"{v:.2f}" for v, _ in values)
            cpu = statistics.median(c for _, c in values)
            print(f"  {name:12s} {statistics.median(v for v, _ in values):6.2f} s  [{rounds}]  "
                  f"CPU {cpu:5.1f} s")


if __name__ == "__main__":
    main()
