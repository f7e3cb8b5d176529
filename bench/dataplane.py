"""Data-plane benchmark: bytes from no-op workers through the dispatcher into trainers, on TCP.

No-op workers (threads here) answer every task at once with a prepared 224 px JSD batch, so
what is measured is the path the bytes take: worker -> dispatcher -> trainer over loopback
TCP. For 1, 2 and 4 trainer processes (each a ``RemoteAugMixLoader`` rank, ``normalize=False``
as a GPU trainer that normalises on the device), it prints, side by side in one run:

- GB/s delivered into all trainers together;
- the dispatcher's CPU seconds per GB relayed, per thread (its Python loop and each ZeroMQ I/O
  thread, ``limits.io_threads`` of them);
- each trainer's CPU seconds per GB received.

    python bench/dataplane.py [--seconds 5] [--trainers 1,2,4] [--io-threads 0,1,2]

(The same-host shared-memory path of issue 13 is not built yet: this is the TCP baseline.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service import Server, noop_fleet, thread_cpu

from augserver.status import request_status

BATCH = 32


def write_job(folder: Path, io_threads: int, samples: int = 4096) -> Path:
    """A 224 px JSD job (batch 32, 43 MB a batch) over tiny images no-op workers never read."""
    data = folder / "plane.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.integers(0, 256, (samples, 8, 8, 3), dtype=np.uint8),
             y=rng.integers(0, 10, samples))
    config = folder / f"plane-{io_threads}.yaml"
    config.write_text(yaml.safe_dump({
        "dataset": {"format": "npz", "path": str(data)}, "preprocess": "imagenet",
        "batch_size": BATCH, "jsd": True, "limits": {"io_threads": io_threads}}))
    return config


def trainer(address: str, rank: int, world: int, seconds: float) -> None:
    """One trainer rank: receive for ``seconds``; prints ``{"bytes", "cpu"}`` as JSON."""
    import torch

    from client.loader import RemoteAugMixLoader

    torch.set_num_threads(1)
    loader = RemoteAugMixLoader(address, rank=rank, world_size=world, normalize=False,
                                channels_last=True, prefetch=8, timeout=60)
    received, start, cpu = 0, None, 0.0
    while True:
        for batch in loader:
            if start is None:  # from the first batch on: the pipeline is full
                start, cpu = time.perf_counter(), time.process_time()
                continue
            received += batch.views.numel()
            if time.perf_counter() - start >= seconds:
                print(json.dumps({"bytes": received, "seconds": time.perf_counter() - start,
                                  "cpu": time.process_time() - cpu}))
                return


def measure(config: Path, trainers: int, seconds: float, workers: int) -> dict[str, object]:
    with Server(config, 0) as server, noop_fleet(server.address, workers):
        request_status(server.address, 30.0)
        ranks = [subprocess.Popen(
            [sys.executable, __file__, "--trainer", server.address, str(r), str(trainers),
             str(seconds)], stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
            for r in range(trainers)]
        time.sleep(1.0)  # the trainers connect and fill their prefetch
        before = thread_cpu(server.process.pid)
        reports = [json.loads(p.communicate(timeout=seconds + 120)[0]) for p in ranks]
        after = thread_cpu(server.process.pid)
    gb = sum(r["bytes"] for r in reports) / 1e9
    span = max(r["seconds"] for r in reports)
    busy = {name: (after[name] - before.get(name, 0.0)) / gb for name in after
            if after[name] - before.get(name, 0.0) > 0.01}
    return {"trainers": trainers, "gb_per_s": gb / span, "dispatcher_cpu_per_gb": busy,
            "trainer_cpu_per_gb": [r["cpu"] / (r["bytes"] / 1e9) for r in reports]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--trainers", default="1,2,4")
    parser.add_argument("--io-threads", default="1,2")
    parser.add_argument("--workers", type=int, default=4, help="no-op worker threads")
    parser.add_argument("--trainer", nargs=4, metavar=("ADDRESS", "RANK", "WORLD", "SECONDS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trainer:
        address, rank, world, seconds = args.trainer
        trainer(address, int(rank), int(world), float(seconds))
        return
    print(f"224 px JSD, batch {BATCH} ({BATCH * 3 * 224 * 224 * 3 / 1e6:.1f} MB), no-op "
          f"workers, loopback TCP, {args.seconds:g} s per run")
    print(f"{'io thr':>6} {'trainers':>8} {'GB/s':>6}  dispatcher CPU-s/GB by thread"
          "                 trainer CPU-s/GB")
    with tempfile.TemporaryDirectory() as tmp:
        for io in (int(n) for n in args.io_threads.split(",")):
            config = write_job(Path(tmp), io)
            for k in (int(n) for n in args.trainers.split(",")):
                r = measure(config, k, args.seconds, args.workers)
                threads = "  ".join(f"{name} {v:.3f}" for name, v in
                                    sorted(r["dispatcher_cpu_per_gb"].items()))
                per_trainer = " ".join(f"{v:.3f}" for v in r["trainer_cpu_per_gb"])
                print(f"{io:>6} {k:>8} {r['gb_per_s']:6.2f}  {threads:<45} {per_trainer}")


if __name__ == "__main__":
    main()
