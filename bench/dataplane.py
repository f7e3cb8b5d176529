"""Data-plane benchmark: bytes from no-op workers through the dispatcher into trainers, through
shared memory and over TCP, side by side in one run.

No-op workers (threads here) answer every task at once with a prepared 224 px JSD batch, so
what is measured is the path the bytes take. ``tcp``: worker -> dispatcher -> trainer over
loopback TCP. ``shm``: the worker's views are in the trainer's shared-memory slot (a real
worker makes them there), only a descriptor crosses the dispatcher, and the trainer copies
the slot out once. For 1, 2 and 4 trainer processes (each a ``RemoteAugMixLoader`` rank,
``normalize=False`` as a GPU trainer that normalises on the device), it prints:

- GB/s delivered into all trainers together;
- the dispatcher's CPU seconds per GB delivered, per thread (its Python loop and each ZeroMQ
  I/O thread, ``limits.io_threads`` of them);
- the workers' sending side: CPU seconds per GB of the no-op worker threads and their ZeroMQ
  I/O thread (everything a worker does besides making the views);
- each trainer's CPU seconds per GB received (for ``shm``, receiving the descriptor and the
  one copy out of the slot; for ``tcp``, receiving the bytes, whose copy into pinned memory a
  CUDA loader then adds).

    python bench/dataplane.py [--seconds 5] [--trainers 1,2,4] [--io-threads 1,2] \
        [--paths shm,tcp] [--batch 32] [--samples 131072]
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


def write_job(folder: Path, io_threads: int, samples: int = 1 << 17, batch: int = BATCH) -> Path:
    """A 224 px JSD job (batch 32: 14.5 MB a batch) over tiny images no-op workers never
    read; epochs long enough (as real ones are) that making a shared-memory arena (about
    0.5 CPU-s per GB of arena, once per trainer, again only after an epoch that lost a slot)
    does not weigh in."""
    data = folder / "plane.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.integers(0, 256, (samples, 8, 8, 3), dtype=np.uint8),
             y=rng.integers(0, 10, samples))
    config = folder / f"plane-{io_threads}.yaml"
    config.write_text(yaml.safe_dump({
        "dataset": {"format": "npz", "path": str(data)}, "preprocess": "imagenet",
        "batch_size": batch, "jsd": True, "limits": {"io_threads": io_threads}}))
    return config


def trainer(address: str, rank: int, world: int, seconds: float, path: str) -> None:
    """One trainer rank: receive for ``seconds``; prints ``{"bytes", "cpu"}`` as JSON."""
    import torch

    from client.loader import RemoteAugMixLoader

    torch.set_num_threads(1)
    loader = RemoteAugMixLoader(address, rank=rank, world_size=world, normalize=False,
                                channels_last=True, prefetch=8, timeout=60,
                                shm=None if path == "shm" else False)
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


def measure(config: Path, trainers: int, seconds: float, workers: int,
            path: str) -> dict[str, object]:
    with Server(config, 0) as server, noop_fleet(server.address, workers):
        request_status(server.address, 30.0)
        ranks = [subprocess.Popen(
            [sys.executable, __file__, "--trainer", server.address, str(r), str(trainers),
             str(seconds), path], stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
            for r in range(trainers)]
        time.sleep(1.0)  # the trainers connect and fill their prefetch
        before, workers_before = thread_cpu(server.process.pid), time.process_time()
        reports = [json.loads(p.communicate(timeout=seconds + 120)[0]) for p in ranks]
        after, workers_cpu = thread_cpu(server.process.pid), time.process_time() - workers_before
        counters = request_status(server.address, 30.0).counters
    gb = sum(r["bytes"] for r in reports) / 1e9
    span = max(r["seconds"] for r in reports)
    busy = {name: (after[name] - before.get(name, 0.0)) / gb for name in after
            if after[name] - before.get(name, 0.0) > 0.01}
    return {"trainers": trainers, "gb_per_s": gb / span, "dispatcher_cpu_per_gb": busy,
            "worker_cpu_per_gb": workers_cpu / gb,
            "trainer_cpu_per_gb": [r["cpu"] / (r["bytes"] / 1e9) for r in reports],
            "shm_share": counters.batches_shm / max(1, counters.batches_shm
                                                    + counters.batches_tcp)}


def memcpy_cost(nbytes: int, rounds: int = 50) -> float:
    """CPU seconds per GB of copying ``nbytes`` between two warm buffers (one thread)."""
    import torch

    torch.set_num_threads(1)
    source, target = torch.ones(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    target.copy_(source)
    start = time.process_time()
    for _ in range(rounds):
        target.copy_(source)
    return (time.process_time() - start) / (rounds * nbytes / 1e9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--trainers", default="1,2,4")
    parser.add_argument("--io-threads", default="1,2")
    parser.add_argument("--workers", type=int, default=4, help="no-op worker threads")
    parser.add_argument("--paths", default="shm,tcp")
    parser.add_argument("--batch", type=int, default=BATCH, help="samples per batch")
    parser.add_argument("--samples", type=int, default=1 << 17, help="samples per epoch")
    parser.add_argument("--trainer", nargs=5,
                        metavar=("ADDRESS", "RANK", "WORLD", "SECONDS", "PATH"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trainer:
        address, rank, world, seconds, path = args.trainer
        trainer(address, int(rank), int(world), float(seconds), path)
        return
    batch_bytes = args.batch * 3 * 224 * 224 * 3
    print(f"224 px JSD, batch {args.batch} ({batch_bytes / 1e6:.1f} MB), "
          f"{args.workers} no-op workers, {args.seconds:g} s per run; CPU seconds per GB "
          "delivered")
    print(f"one memcpy of a batch into warm memory here: {memcpy_cost(batch_bytes):.3f} "
          "CPU-s/GB (the floor of a trainer's one copy)")
    print(f"{'path':>4} {'io':>3} {'trainers':>8} {'GB/s':>6}  "
          f"{'dispatcher, by thread':<45} {'workers':>7}  trainers")
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.paths.split(","):
            for io in (int(n) for n in args.io_threads.split(",")):
                config = write_job(Path(tmp), io, args.samples, args.batch)
                for k in (int(n) for n in args.trainers.split(",")):
                    r = measure(config, k, args.seconds, args.workers, path)
                    assert path == "tcp" or r["shm_share"] == 1.0, r  # it took the path asked
                    threads = "  ".join(f"{name} {v:.3f}" for name, v in
                                        sorted(r["dispatcher_cpu_per_gb"].items()))
                    per_trainer = " ".join(f"{v:.3f}" for v in r["trainer_cpu_per_gb"])
                    print(f"{path:>4} {io:>3} {k:>8} {r['gb_per_s']:6.2f}  {threads:<45} "
                          f"{r['worker_cpu_per_gb']:7.3f}  {per_trainer}", flush=True)


if __name__ == "__main__":
    main()
