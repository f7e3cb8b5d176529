"""Warm-up: the kernels compile once, ahead of the workers, and no worker takes a task before
its kernels are loaded (status shows it warming up meanwhile, and it keeps heartbeating)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from augserver import worker as worker_module
from augserver.kernels_cache import load_kernels
from augserver.status import request_status
from client.loader import RemoteAugMixLoader
from tests.service_helpers import (
    REPO,
    RawClient,
    dispatcher_thread,
    end_process,
    free_port,
    job,
    make_npz,
    wait_for,
    worker_threads,
    write_config,
)

pytestmark = pytest.mark.service


def test_a_warming_worker_heartbeats_and_takes_no_task_until_its_kernels_are_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = threading.Event()

    def slow_load():  # 4 heartbeat timeouts of FAST_LIMITS (0.6 s) while "compiling"
        loaded.wait(10)
        return load_kernels()

    monkeypatch.setattr(worker_module, "load_kernels", slow_load)
    config = job(tmp_path, make_npz(tmp_path, 16))
    with dispatcher_thread(config) as d, RawClient(d.address) as client, \
            worker_threads(d.address, 1):
        client.hello()
        assert client.open("s", credits=4).type == "opened"
        wait_for(lambda: request_status(d.address).workers, 10, "the worker's hello")
        time.sleep(2.5)
        [seen] = request_status(d.address).workers  # still there: it heartbeats meanwhile
        assert seen.state == "warming" and seen.in_flight == 0 and seen.tasks_done == 0
        assert client.recv(0.2) is None, "a batch before the kernels were loaded"
        loaded.set()
        assert client.expect("batch", timeout=20)["stream"] == "s"
        assert request_status(d.address).workers[0].state == "ready"
        assert d.state.counters.tasks_reissued == 0


@pytest.mark.slow
def test_serve_compiles_once_and_its_workers_load_from_the_cache(tmp_path: Path) -> None:
    """An empty NUMBA_CACHE_DIR, as after a plain pip install: serve compiles the kernels
    before it starts its 2 workers, both load them from the cache, and the first batch comes."""
    cache = tmp_path / "numba"
    address = f"tcp://127.0.0.1:{free_port()}"
    config = write_config(tmp_path, make_npz(tmp_path, 32))
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        serve = subprocess.Popen(
            [sys.executable, "-m", "augserver", "serve", "--config", str(config), "--bind",
             address, "--workers", "2", "--log-level", "INFO"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        loader = RemoteAugMixLoader(address, timeout=120)
        batch = next(iter(loader))
        assert len(batch) == 4
        # the first batch may come from one worker while the other still loads its kernels
        wait_for(lambda: [w.state for w in request_status(address).workers] == ["ready"] * 2,
                 60, "both workers to load their kernels")
    finally:
        end_process(serve)
    text = log.read_text()
    compiled = [line for line in text.splitlines() if "AugMix kernels compiled" in line]
    loaded = [line for line in text.splitlines() if "AugMix kernels loaded from the cache" in line]
    assert len(compiled) == 1 and "augserver.kernels" in compiled[0], text[-3000:]
    assert len(loaded) == 2 and all("augserver.worker" in line for line in loaded), text[-3000:]
    assert str(cache) in compiled[0]
    assert text.index(compiled[0]) < min(text.index(line) for line in loaded)
