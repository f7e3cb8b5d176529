"""Service benchmark: dispatcher + workers + RemoteAugMixLoader, end to end on loopback.

Prints, from one run on this machine:
1. end-to-end samples/s through the service with W workers, side by side with a PyTorch
   DataLoader with the same number of workers running the usual per-image PIL AugMix dataset
   (the comparator of bench/kernel.py), and the ratio;
2. transport overhead: the service with 1 worker against the kernel's own rate in one process
   (median of paired rounds);
3. time to first batch of a new epoch (workers warm);
4. the loopback ceiling with augmentation off (simulated workers answer every task at once with
   a prepared batch): GB/s that reach the training process through RemoteAugMixLoader;
5. how many tasks/s one dispatcher assigns and relays with many no-op workers (target 20k/s).

    python bench/service.py [--workers 2] [--samples 8192] [--seconds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import skimage.data
import torch
import zmq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel import UsualAugMix

from augserver import protocol, session
from augserver.augmix import augmix_views, sample_rng
from augserver.config import config_from_dict, load_config
from augserver.datasets import open_dataset
from augserver.preprocessing import preprocess
from augserver.shm import Attachments, ShmError, Slot, shm_dir
from augserver.status import request_status
from client.loader import RemoteAugMixLoader
from client.programs.local_server import free_port


def photo_crops(n: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """``n`` real-photo images: random 96x96 crops of scikit-image photos resized to ``size``
    (upsampled for sizes above 96: the content matters less than the pixel count here)."""
    rng = np.random.default_rng(0)
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]
    images = []
    for i in range(n):
        photo = photos[i % len(photos)]
        top = rng.integers(0, photo.shape[0] - 96)
        left = rng.integers(0, photo.shape[1] - 96)
        crop = Image.fromarray(photo[top : top + 96, left : left + 96])
        images.append(np.asarray(crop.resize((size, size), Image.BILINEAR)))
    return np.stack(images), rng.integers(0, 10, size=n)


class Server:
    """``augserver serve`` in a subprocess, stopped on exit."""

    def __init__(self, config: Path, workers: int) -> None:
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "augserver", "serve", "--config", str(config),
             "--bind", self.address, "--workers", str(workers), "--log-level", "WARNING"]
        )  # fmt: skip

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def epoch_rate(loader: RemoteAugMixLoader, epoch: int) -> tuple[float, float]:
    """(steady samples/s over one epoch, seconds to the first batch) through ``loader``.

    The rate counts from the first batch on, so the pipeline fill at the start of an epoch (its
    own figure) does not weigh on short benchmark epochs as it would not on real ones."""
    loader.set_epoch(epoch)
    start = time.perf_counter()
    first_at = None
    samples = 0
    for batch in loader:
        if first_at is None:
            first_at = time.perf_counter()
            continue
        samples += len(batch)
    assert first_at is not None
    return samples / (time.perf_counter() - first_at), first_at - start


def service_rate(config: Path, workers: int) -> tuple[float, float]:
    """(samples/s of one epoch, seconds to the first batch of a new epoch), warm workers."""
    with Server(config, workers) as server:
        loader = RemoteAugMixLoader(server.address, prefetch=8, timeout=120)
        epoch_rate(loader, 0)  # warm: workers compiled and the page cache full
        rate, _ = epoch_rate(loader, 1)
        _, first = epoch_rate(loader, 2)
        return rate, first


def transport_overhead(config: Path, seconds: float, rounds: int = 5) -> dict[str, float]:
    """The 1-worker service (``serve --workers 1``) against the kernel alone in this
    process, in ``rounds`` adjacent pairs: ``overhead`` is the median over the pairs of
    ``1 - service / kernel`` (samples/s, wall clock; pairs cancel this VM's slow drifts),
    ``best`` the same from the best rate of each side; ``cpu`` the worker process's CPU per
    sample over the kernel's, minus 1. A service round runs epochs for about ``seconds``.

    The loader takes the batches as delivered (uint8, NHWC memory: ``normalize=False,
    channels_last=True``): on a GPU trainer the layout change and the normalisation run on the
    device; here they would take CPU from the one worker being measured."""
    with Server(config, 1) as server:
        loader = RemoteAugMixLoader(
            server.address, prefetch=8, timeout=120, normalize=False, channels_last=True
        )
        epoch_rate(loader, 0)
        name = request_status(server.address).workers[0].name
        worker_pid = int(name.rsplit(":", 1)[1])
        samples_per_epoch = len(loader) * loader.config.batch_size
        pairs, kernels, services, kernel_cpu, service_cpu = [], [], [], [], []
        epoch = 1
        for _ in range(rounds):
            rate, cpu = kernel_rate(config, seconds)
            kernels.append(rate)
            kernel_cpu.append(cpu)
            before, start, rates = cpu_seconds(worker_pid), time.perf_counter(), []
            while not rates or time.perf_counter() - start < seconds:
                rates.append(epoch_rate(loader, epoch)[0])
                epoch += 1
            used = cpu_seconds(worker_pid) - before
            service_cpu.append(used / (len(rates) * samples_per_epoch))
            services.append(statistics.mean(rates))
            pairs.append(1 - services[-1] / rate)
        return {
            "service": max(services), "kernel": max(kernels),
            "overhead": statistics.median(pairs), "best": 1 - max(services) / max(kernels),
            "cpu": min(service_cpu) / min(kernel_cpu) - 1,
        }  # fmt: skip


class UsualDataset(torch.utils.data.Dataset):
    """The usual AugMix dataset: PIL images, reference PIL ops, ToTensor+Normalize per chain."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.images = [Image.fromarray(img) for img in x]
        self.labels = y
        self.augmix = UsualAugMix("cifar", 3)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple:
        return self.augmix(self.images[i], np.random.default_rng(i)), int(self.labels[i])


def dataloader_rate(x: np.ndarray, y: np.ndarray, workers: int, batch: int) -> float:
    loader = torch.utils.data.DataLoader(
        UsualDataset(x, y), batch_size=batch, shuffle=True, num_workers=workers,
        persistent_workers=True, prefetch_factor=4,
    )  # fmt: skip
    for _ in loader:  # warm-up epoch
        pass
    start = time.perf_counter()
    samples = sum(len(labels) for _, labels in loader)
    return samples / (time.perf_counter() - start)


def kernel_rate(config: Path, seconds: float) -> tuple[float, float]:
    """The kernel's own (samples/s, CPU seconds per sample) in this process: read, crop and
    AugMix exactly as a worker does."""
    job = load_config(config)
    d = job.dataset
    dataset = open_dataset(d.format, d.path, d.train, d.s3)
    out = np.empty((2, job.image_size, job.image_size, 3), np.uint8)
    count = 0
    cpu = time.process_time()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        i = count % len(dataset)
        rng = sample_rng(job.seed, 0, i)
        image = dataset.sample(
            i, lambda s, rng=rng: preprocess(job.preprocess, s, rng, job.image_size))
        augmix_views(image, rng, job.augmix, 2, out=out)
        count += 1
    return count / (time.perf_counter() - start), (time.process_time() - cpu) / count


# --------------------------------------------------------------- simulated (no-op) workers


def noop_worker(address: str, stop: threading.Event, context: zmq.Context) -> None:
    """A worker that answers every task at once with a prepared batch of the right shape; a
    task naming a shared-memory slot it can open gets the batch written there with one
    ``pwrite``, as a real worker does, and the answer is labels and indices alone."""
    attachments = Attachments(shm_dir())
    sock = session.dealer(context, address)
    welcome = session.handshake(sock, "worker", f"noop-{threading.get_native_id()}", address,
                                30.0, curve=False)
    job = config_from_dict(welcome["config"], check_paths=False)
    pixels = np.zeros_like(job.layout.empty_views(job.batch_size))
    labels = np.zeros(job.batch_size, np.int64)
    receipt = welcome.receipt  # returned on every message, as real workers do
    sock.send_multipart(protocol.encode("ready", slots=4, dataset=welcome["dataset"],
                                        receipt=receipt))
    last_beat = time.monotonic()
    while not stop.is_set():
        if time.monotonic() - last_beat > 0.5:
            sock.send_multipart(protocol.encode("heartbeat", receipt=receipt))
            last_beat = time.monotonic()
        if not sock.poll(100):
            continue
        message = protocol.decode(sock.recv_multipart(copy=False))
        receipt = message.receipt
        if message.type != "task":
            continue
        indices = np.asarray(message["indices"], np.int64)
        n = len(indices)
        arrays, status = [pixels[:, :n], labels[:n], indices], protocol.SLOT_NONE
        wire = message["slot"]
        if wire is not None:
            try:
                writer = attachments.writer(Slot.from_wire(wire), pixels[:, :n].nbytes)
                try:
                    writer.write(pixels[:, :n])  # the one write a real worker makes
                finally:
                    writer.close()
                arrays, status = arrays[1:], protocol.SLOT_WRITTEN
            except ShmError:
                status = protocol.SLOT_UNUSABLE
        sock.send_multipart(
            protocol.encode("result", arrays, task=message["task"], failed=[], slot=status,
                            receipt=receipt),
            copy=False,
        )
    sock.close()
    attachments.close()


@contextlib.contextmanager
def noop_fleet(address: str, workers: int) -> Iterator[zmq.Context]:
    """``workers`` no-op worker threads connected to ``address``; yields their context."""
    stop = threading.Event()
    context = zmq.Context()
    threads = [
        threading.Thread(target=noop_worker, args=(address, stop, context), daemon=True)
        for _ in range(workers)
    ]
    for t in threads:
        t.start()
    try:
        yield context
    finally:
        stop.set()
        for t in threads:
            t.join()
        context.term()


def loopback_ceiling(config: Path, seconds: float, workers: int) -> float:
    """GB/s of batches reaching RemoteAugMixLoader as delivered (uint8, NHWC memory) from no-op
    workers."""
    with Server(config, 0) as server, noop_fleet(server.address, workers):
        loader = RemoteAugMixLoader(
            server.address, prefetch=16, normalize=False, channels_last=True, timeout=60
        )
        total = 0
        start = time.perf_counter()
        epoch = 0
        while time.perf_counter() - start < seconds:
            loader.set_epoch(epoch)
            for batch in loader:
                total += sum(v.numel() for v in (batch.orig, batch.aug1, batch.aug2))
            epoch += 1
        return total / (time.perf_counter() - start) / 1e9


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU time of process ``pid`` (or its thread ``tid``) so far (``/proc``)."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of ``pid`` by name: the Python loop is the thread named
    like the process (``python``), ZeroMQ's I/O thread is ``ZMQbg/IO/0``."""
    totals: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        totals[name] = totals.get(name, 0.0) + cpu_seconds(pid, int(tid))
    return totals


_CREDIT_BLOCK = 16
"""The simulated client grants credits 16 at a time, as a client consuming batches this fast
would (RemoteAugMixLoader's I/O thread sends the grants that piled up since it last woke)."""


def dispatcher_tasks_per_second(
    config: Path, seconds: float, workers: int
) -> tuple[float, dict[str, float]]:
    """(tasks/s, dispatcher CPU seconds per task by thread) with batch-size-1 tasks, no-op
    workers and a raw client that grants credits as fast as batches arrive. On a small machine
    the load generators share the cores with the dispatcher; its busiest thread's CPU time per
    task bounds what it can do with cores of its own."""
    with Server(config, 0) as server, noop_fleet(server.address, workers) as context:
        sock = session.dealer(context, server.address)
        session.handshake(sock, "client", "bench", server.address, 30.0, curve=False)
        received = 0
        epoch = 0
        cpu_start = thread_cpu(server.process.pid)
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            sock.send_multipart(
                protocol.encode(
                    "open", stream=f"s{epoch}", epoch=epoch, rank=0, world_size=1,
                    ordered=False, credits=256, done=[], skip=None,
                )
            )  # fmt: skip
            while True:
                message = protocol.decode(sock.recv_multipart(copy=False))
                if message.type == "batch":
                    received += 1
                    if received % _CREDIT_BLOCK == 0:
                        sock.send_multipart(
                            protocol.encode("credit", stream=f"s{epoch}", n=_CREDIT_BLOCK,
                                            receipt=message.receipt)
                        )
                elif message.type == "end":
                    break
            epoch += 1
        rate = received / (time.perf_counter() - start)
        cpu_end = thread_cpu(server.process.pid)
        sock.close()
    per_task = {
        name: (cpu_end[name] - cpu_start.get(name, 0.0)) / max(received, 1) for name in cpu_end
    }
    return rate, {name: cpu for name, cpu in per_task.items() if cpu > 1e-6}


def big_job(folder: Path) -> Path:
    """1024 real-photo images at 256x256 with ImageNet preprocessing (224 crops), batch 32."""
    x, y = photo_crops(1024, size=256)
    np.savez(folder / "photos256.npz", x=x, y=y)
    path = folder / "big.yaml"
    path.write_text(
        f"dataset: {{format: npz, path: {folder / 'photos256.npz'}}}\n"
        "preprocess: imagenet\nbatch_size: 32\n"
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    with tempfile.TemporaryDirectory(prefix="augserver-bench-") as tmp:
        x, y = photo_crops(args.samples)
        np.savez(Path(tmp) / "photos32.npz", x=x, y=y)
        config = Path(tmp) / "bench.yaml"
        config.write_text(
            f"dataset: {{format: npz, path: {Path(tmp) / 'photos32.npz'}}}\n"
            f"preprocess: cifar\nbatch_size: {args.batch_size}\n"
        )
        tiny = Path(tmp) / "tiny.yaml"
        tiny.write_text(
            f"dataset: {{format: npz, path: {Path(tmp) / 'photos32.npz'}}}\n"
            "preprocess: cifar\nbatch_size: 1\n"
        )
        print(f"dataset: {args.samples} real-photo images 32x32, CIFAR preprocessing, severity 3,"
              f" JSD, batch {args.batch_size}, {os.cpu_count()} cores")
        service, first = service_rate(config, args.workers)
        usual = dataloader_rate(x, y, args.workers, args.batch_size)
        print(
            f"1. end to end, {args.workers} workers: augserver {service:8.0f} samples/s   "
            f"DataLoader + usual PIL AugMix {usual:7.0f} samples/s   ratio {service / usual:.1f}x"
        )
        for label, job_file in (("32x32", config), ("224x224", big_job(Path(tmp)))):
            t = transport_overhead(job_file, args.seconds / 2)
            print(
                f"2. transport, {label}, 1 worker: {t['service']:6.0f} vs kernel alone "
                f"{t['kernel']:6.0f} samples/s; overhead {100 * t['overhead']:.1f} % (median of "
                f"paired rounds; best vs best {100 * t['best']:.1f} %), worker CPU per sample "
                f"+{100 * t['cpu']:.1f} %"
            )
        print(f"3. time to first batch (new epoch, warm workers): {first * 1000:.0f} ms")
        ceiling = loopback_ceiling(config, args.seconds, args.workers)
        print(f"4. loopback ceiling, augmentation off: {ceiling:.2f} GB/s into the trainer")
        tasks, cpu = dispatcher_tasks_per_second(tiny, args.seconds, 8)
        threads = ", ".join(f"{name} {t * 1e6:.0f} us" for name, t in sorted(cpu.items()))
        print(
            f"5. one dispatcher, 8 no-op workers: {tasks:8.0f} tasks/s assigned and relayed; "
            f"dispatcher CPU per task: {threads}; total {sum(cpu.values()) * 1e6:.0f} us = "
            f"{1 / sum(cpu.values()):,.0f} tasks/s on one core, busiest thread "
            f"{1 / max(cpu.values()):,.0f} tasks/s"
        )


if __name__ == "__main__":
    main()
