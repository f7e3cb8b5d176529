"""Per-sample limits: a sample slower than limits.sample_seconds is failed with its path and
never retried (the worker keeps heartbeating meanwhile), and images above
limits.max_image_pixels are refused before they are decoded."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from augserver import worker as worker_module
from augserver.status import request_status
from tests.service_helpers import RawClient, dispatcher_thread, job, make_npz, worker_threads

pytestmark = pytest.mark.service


def test_a_sample_slower_than_its_limit_is_failed_and_the_stream_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow_index, release = 5, threading.Event()
    real = worker_module._fill_sample

    def fill(job: Any, epoch: int, index: int, slot: np.ndarray) -> None:
        if index == slow_index:
            release.wait(20)  # far beyond the heartbeat timeout (0.6 s) and the limit (1 s)
        real(job, epoch, index, slot)

    monkeypatch.setattr(worker_module, "_fill_sample", fill)
    config = job(tmp_path, make_npz(tmp_path, 16), limits={"sample_seconds": 1.0})
    try:
        with dispatcher_thread(config) as d, worker_threads(d.address, 1), \
                RawClient(d.address) as c:
            c.hello()
            c.open("s", credits=8)
            start = time.monotonic()
            got = c.collect({"s"}, timeout=30)
            took = time.monotonic() - start
            stats = request_status(d.address)
    finally:
        release.set()
    assert got["errors"] == {}
    assert sorted(b.position for b in got["s"]) == list(range(4))  # every batch, full
    assert all(len(b.indices) == 4 for b in got["s"])
    failed = [f for b in got["s"] for f in b.failed]
    assert [f[0] for f in failed] == [slow_index]
    assert "limits.sample_seconds" in failed[0][2] and failed[0][1].endswith("data.npz[5]")
    delivered = [i for b in got["s"] for i in b.indices.tolist()]
    assert slow_index not in delivered and delivered.count(slow_index + 1) == 2  # its stand-in
    assert stats.counters.tasks_reissued == 0 and len(stats.workers) == 1  # never declared dead
    assert took < 15


def test_an_image_above_the_pixel_limit_is_refused_before_decoding(tmp_path: Path) -> None:
    root = tmp_path / "images"
    for name, side in (("a", 32), ("b", 32), ("c", 200)):
        (root / name).mkdir(parents=True)
        Image.fromarray(np.full((side, side, 3), 99, np.uint8)).save(root / name / "x.png")
    config = job(tmp_path, root, "imagefolder", limits={"max_image_pixels": 10_000})
    with dispatcher_thread(config) as d, worker_threads(d.address, 1), RawClient(d.address) as c:
        c.hello()
        c.open("s", credits=4)
        got = c.collect({"s"}, timeout=30)
    failed = [f for b in got["s"] for f in b.failed]
    assert len(failed) == 1 and failed[0][1].endswith("c/x.png")
    assert "200 x 200 pixels exceed limits.max_image_pixels (10000)" in failed[0][2]


def test_a_worker_whose_dataset_differs_is_refused_naming_what_and_the_stream_fails(
    tmp_path: Path
) -> None:
    """One image renamed (same count): the dispatcher refuses the worker that sees the new
    folder, naming the class; the stream no worker can serve fails, saying why."""
    root = tmp_path / "images"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((32, 32, 3), i, np.uint8)).save(root / name / f"{i}.png")
    config = job(tmp_path, root, "imagefolder", limits={"no_worker_seconds": 1.5})
    with dispatcher_thread(config) as d, RawClient(d.address) as c:
        (root / "b" / "2.png").rename(root / "b" / "9.png")  # changed under the running job
        c.hello()
        c.open("s", credits=2)
        stop = threading.Event()
        thread = threading.Thread(target=worker_module.run_worker, args=(d.address, "w", stop),
                                  daemon=True)
        thread.start()
        thread.join(30)
        assert not thread.is_alive(), "a refused worker stops for good"
        error = c.expect("error", timeout=10)
        assert error["fatal"] and "no worker could serve this stream for 1.5 s" in error["message"]
        assert "class b differs" in error["message"] and "worker w" in error["message"]
        assert request_status(d.address).workers == []


def test_fingerprints_name_what_differs(tmp_path: Path) -> None:
    from augserver.datasets import fingerprint_mismatch, open_dataset

    path = make_npz(tmp_path, 8)
    first = open_dataset("npz", str(path)).fingerprint()
    assert open_dataset("npz", str(path)).fingerprint() == first  # stable
    data = dict(np.load(path))
    data["x"][3, 0, 0, 0] ^= 1  # one pixel
    np.savez(path, **data)
    changed = open_dataset("npz", str(path)).fingerprint()
    assert fingerprint_mismatch(first, changed) == (
        "the dataset differs from the dispatcher's: pixels differs")
    data["y"] = np.arange(9) % 10
    data["x"] = np.concatenate([data["x"], data["x"][:1]])
    np.savez(path, **data)
    grown = open_dataset("npz", str(path)).fingerprint()
    assert "9 samples here, 8 at the dispatcher" in fingerprint_mismatch(first, grown)
    assert fingerprint_mismatch(first, first) is None
