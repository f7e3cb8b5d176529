"""The Prometheus endpoint end to end: a dispatcher, workers and a scrape mid-stream."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import augserver.worker
from augserver.metrics import MetricsServer
from augserver.status import format_status
from tests.service_helpers import (
    RawClient,
    dispatcher_thread,
    end_process,
    free_port,
    job,
    make_npz,
    parse_exposition,
    spawn,
    wait_for,
    worker_threads,
    write_config,
)

pytestmark = pytest.mark.service


# ---------------------------------------------------------------------------- end to end


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def scrape_mid_stream(tmp_path: Path, client_delay: float) -> dict[tuple[str, str], float]:
    """Run one 12-batch stream (prefetch 2) against one worker; scrape /metrics at batch 8."""
    config = job(tmp_path, make_npz(tmp_path, 48))
    scraped: dict[tuple[str, str], float] = {}
    with dispatcher_thread(config) as dispatcher:
        server = MetricsServer("127.0.0.1:0", dispatcher.start_snapshots()).start()
        url = f"http://127.0.0.1:{server.address[1]}/metrics"
        try:
            with worker_threads(dispatcher.address, 1), RawClient(dispatcher.address) as client:
                assert client.hello().type == "welcome"
                wait_for(lambda: dispatcher.snapshot and dispatcher.snapshot.workers, 10,
                         "the worker")
                assert client.open("s", credits=2).type == "opened"
                seen = [0]

                def on_batch(batch: Any) -> None:
                    time.sleep(client_delay)
                    seen[0] += 1
                    if seen[0] == 8:
                        status, kind, text = get(url)
                        assert status == 200 and kind.startswith("text/plain; version=0.0.4")
                        scraped.update(parse_exposition(text)[1])

                result = client.collect({"s"}, timeout=60, on_batch=on_batch)
                assert sorted(b.position for b in result["s"]) == list(range(12))
            assert get(url.replace("/metrics", "/other"))[0] == 404
            assert "workers_needed" in format_status(dispatcher.snapshot)
        finally:
            server.close()
    return scraped


def slow_samples(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Every sample a worker thread makes takes ``seconds`` longer."""
    original: Callable[..., Any] = augserver.worker._fill_sample

    def slow(*args: Any) -> Any:
        time.sleep(seconds)
        return original(*args)

    monkeypatch.setattr(augserver.worker, "_fill_sample", slow)


def wait_ratio(values: dict[tuple[str, str], float]) -> float:
    [ratio] = [v for (name, _), v in values.items() if name == "augserver_stream_data_wait_ratio"]
    return ratio


def test_endpoint_data_wait_is_high_when_one_slow_worker_feeds_a_fast_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow_samples(monkeypatch, 0.02)  # 4 samples per batch: ~12 batches/s
    values = scrape_mid_stream(tmp_path, client_delay=0.0)
    assert values[("augserver_workers", "")] == 1
    [(labels, rate)] = [(k[1], v) for k, v in values.items()
                        if k[0] == "augserver_worker_samples_per_second"]
    assert labels.startswith('{worker="') and 20 < rate < 200
    assert values[("augserver_consumption_samples_per_second", "")] > 10
    assert wait_ratio(values) > 0.6
    assert values[("augserver_workers_needed", "")] >= 2
    assert values[("augserver_tasks_reissued_total", "")] == 0


def test_endpoint_data_wait_is_low_when_the_client_is_slow(tmp_path: Path) -> None:
    values = scrape_mid_stream(tmp_path, client_delay=0.1)  # the worker is ~100x faster
    assert wait_ratio(values) < 0.2
    assert values[("augserver_workers_needed", "")] == 1


def test_serve_metrics_flag(tmp_path: Path) -> None:
    config = write_config(tmp_path, make_npz(tmp_path, 8))
    port = free_port()
    proc = spawn(["serve", "--config", str(config), "--metrics", f"127.0.0.1:{port}",
                  "--log-level", "WARNING"])
    try:
        def scrape() -> str | None:
            try:
                return get(f"http://127.0.0.1:{port}/metrics")[2]
            except OSError:
                return None

        text = wait_for(scrape, 20, "the metrics endpoint", interval=0.1)
        assert "augserver_workers 0" in text and "augserver_up 1" in text
    finally:
        assert end_process(proc) == 0
