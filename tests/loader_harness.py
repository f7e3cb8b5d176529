"""Processes for the end-to-end tests: a dispatcher and workers on loopback, always ended."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def photo_npz(path: Path, n: int = 48, size: int = 32) -> Path:
    """``n`` real-photo images (crops of scikit-image photos) with labels, as an ``.npz``."""
    rng = np.random.default_rng(0)
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]
    images = []
    for i in range(n):
        photo = photos[i % 3]
        top, left = rng.integers(0, photo.shape[0] - 64), rng.integers(0, photo.shape[1] - 64)
        crop = Image.fromarray(photo[top : top + 64, left : left + 64])
        images.append(np.asarray(crop.resize((size, size), Image.BILINEAR)))
    np.savez(path, x=np.stack(images), y=np.arange(n) % 10)
    return path


def job_config(
    tmp: Path, n: int = 48, batch_size: int = 8, preprocess: str = "cifar", **keys: object
) -> Path:
    """A YAML job over :func:`photo_npz` (CIFAR preprocessing by default) plus extra keys."""
    data = photo_npz(tmp / "photos.npz", n)
    lines = [f"dataset: {{format: npz, path: {data}}}", f"preprocess: {preprocess}"]
    lines += [f"batch_size: {batch_size}", *(f"{key}: {value}" for key, value in keys.items())]
    config = tmp / "job.yaml"
    config.write_text("\n".join(lines) + "\n")
    return config


class Processes:
    """Starts ``augserver`` subprocesses and ends every one of them on :meth:`close`."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def serve(self, config: Path, address: str, workers: int = 0) -> subprocess.Popen:
        return self._start(
            "serve", "--config", str(config), "--bind", address, "--workers", str(workers)
        )

    def worker(self, address: str) -> subprocess.Popen:
        return self._start("worker", "--connect", address)

    def _start(self, *args: str) -> subprocess.Popen:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen([sys.executable, "-m", "augserver", *args], env=env)
        self.procs.append(proc)
        return proc

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        """SIGKILL, as a crash or an OOM kill would."""
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
