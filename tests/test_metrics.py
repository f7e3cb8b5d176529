"""The scaling signal and the Prometheus endpoint: rendering, the meter, end to end."""

from __future__ import annotations

import dataclasses
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import augserver.worker
from augserver.addresses import local_address, parse_host_port
from augserver.config import ConfigError, load_config
from augserver.metrics import MetricsServer, escape, render
from augserver.scaling import WAIT_THRESHOLD, StreamMeter, estimate
from augserver.stats import DispatcherStats, StreamStats
from augserver.status import format_status
from tests.service_helpers import (
    RawClient,
    dispatcher_thread,
    end_process,
    free_port,
    job,
    make_npz,
    spawn,
    wait_for,
    worker_threads,
    write_config,
)

_SAMPLE = re.compile(r'([a-z_]+)(\{(?:[a-z_]+="(?:[^"\\]|\\.)*",?)*\})? (-?[0-9.e+]+|NaN)')


def hand_made_stats() -> DispatcherStats:
    stream = {"stream": "s1", "samples_per_s": 40.0, "batches_per_s": 10.0, "data_wait": 0.75,
              "epoch": 0, "rank": 0, "world_size": 1, "ordered": False, "delivered": 3,
              "num_batches": 12, "credits": 2, "in_flight": 2, "pending": 7}
    return DispatcherStats.from_dict({
        "uptime_s": 12.5, "address": "tcp://127.0.0.1:5555", "dataset_len": 48,
        "config": {"dataset": "npz:/d.npz"},
        "workers": [
            {"name": 'host"a\\b\nc:1', "samples_per_s": 20.0, "tasks_done": 5, "in_flight": 1,
             "free_slots": 1, "last_seen_s_ago": 0.1},
            {"name": "host-b:2", "samples_per_s": 20.0, "tasks_done": 5, "in_flight": 1,
             "free_slots": 1, "last_seen_s_ago": 0.1},
        ],
        "clients": [{"name": "trainer", "last_seen_s_ago": 0.2, "streams": [stream]}],
        "scaling": dataclasses.asdict(estimate([20.0, 20.0], [StreamStats(**stream)])),
        "counters": {"tasks_reissued": 3, "duplicates_dropped": 1, "samples_failed": 2,
                     "malformed_messages": 4, "handler_errors": 5},
        "recent_failures": [],
    })


def parse(text: str) -> tuple[dict[str, str], dict[tuple[str, str], float]]:
    """(metric family -> type, (name, labels) -> value); every line must be well formed."""
    types: dict[str, str] = {}
    values: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
        elif not line.startswith("# HELP "):
            match = _SAMPLE.fullmatch(line)
            assert match, f"not a sample line: {line!r}"
            assert match[1] in types, f"{match[1]} has no # TYPE line before it"
            values[(match[1], match[2] or "")] = float(match[3])
    return types, values


# ---------------------------------------------------------------------------- rendering


def test_render_types_values_and_escaping() -> None:
    text = render(hand_made_stats())
    assert text.endswith("\n")
    types, values = parse(text)
    assert types["augserver_workers"] == "gauge"
    for name in ("tasks_reissued", "duplicates_dropped", "samples_failed", "malformed_messages",
                 "handler_errors"):
        assert types[f"augserver_{name}_total"] == "counter"
    assert values[("augserver_handler_errors_total", "")] == 5
    assert values[("augserver_workers", "")] == 2
    assert values[("augserver_tasks_reissued_total", "")] == 3
    assert values[("augserver_malformed_messages_total", "")] == 4
    escaped = '{worker="host\\"a\\\\b\\nc:1"}'
    assert values[("augserver_worker_samples_per_second", escaped)] == 20.0
    assert values[("augserver_stream_data_wait_ratio", '{client="trainer",stream="s1"}')] == 0.75
    # 40 samples/s at 25% busy: a demand of 160 samples/s, 20 per worker -> 8 workers
    assert values[("augserver_workers_needed", "")] == 8
    assert text.count("# HELP augserver_workers ") == 1


def test_escape_and_bind_parsing() -> None:
    assert escape('a\\b"c\nd') == 'a\\\\b\\"c\\nd'
    assert parse_host_port("0.0.0.0:9100") == ("0.0.0.0", 9100)
    assert parse_host_port("[::]:0") == ("::", 0)
    assert local_address("tcp://0.0.0.0:5555") == "tcp://127.0.0.1:5555"
    assert local_address("tcp://[::]:5555") == "tcp://[::1]:5555"
    assert local_address("tcp://10.0.0.1:5555") == "tcp://10.0.0.1:5555"
    for bad in ("9100", "host:", "host:99999", "tcp://host:1", "a b:1"):
        with pytest.raises(ValueError):
            parse_host_port(bad)


def test_metrics_bind_is_validated_in_the_config(tmp_path: Path) -> None:
    data = make_npz(tmp_path, 8)
    assert load_config(write_config(tmp_path, data)).metrics.bind is None
    path = write_config(tmp_path, data, metrics={"bind": "127.0.0.1:9100"})
    assert load_config(path).metrics.bind == "127.0.0.1:9100"
    assert load_config(path, {"metrics.bind": "[::]:9200"}).metrics.bind == "[::]:9200"
    for bad in ("9100", 9100, "x:70000"):
        with pytest.raises(ConfigError, match=r"metrics\.bind: must be HOST:PORT"):
            load_config(write_config(tmp_path, data, metrics={"bind": bad}))


# ---------------------------------------------------------------------------- the meter


def test_meter_counts_time_with_the_whole_window_owed() -> None:
    meter = StreamMeter(opened=100.0)
    meter.credits(100.0, 4)  # opened with 4 credits: waiting for the first batch
    meter.delivered(101.0, 8, 3)  # 1 s waited
    meter.credits(101.5, 4)  # the trainer ate it and its buffer is empty again
    meter.delivered(102.0, 8, 3)  # 0.5 s waited
    meter.delivered(102.1, 8, 2)
    stats = meter.stats(104.0)  # 4 s of life, 1.5 s waiting
    assert stats == {"batches_per_s": 0.75, "samples_per_s": 6.0, "data_wait": 0.375}
    meter.credits(104.0, 4)
    assert meter.stats(134.0)["data_wait"] == 1.0  # the window only sees the last 10 s
    assert meter.stats(134.0)["samples_per_s"] == 0.0


def consuming(samples_per_s: float, data_wait: float) -> StreamStats:
    """A stream's stats that matter to the scaling signal."""
    return StreamStats("s", 0, 0, 1, False, 10, 0, 1, 0, 0, 0.0, samples_per_s, data_wait)


def test_workers_needed_formula() -> None:
    fed = consuming(100.0, WAIT_THRESHOLD)
    assert estimate([50.0, 50.0], [fed]).workers_needed == 2
    starved = consuming(100.0, 0.5)  # could eat 200/s
    assert estimate([50.0, 50.0], [starved]).workers_needed == 4
    assert estimate([50.0, 0.0], [starved]).workers_needed == 4  # idle ones do not count
    assert estimate([], [consuming(0.0, 1.0)]).workers_needed == 1
    assert estimate([10.0], []).workers_needed == 1


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
                        scraped.update(parse(text)[1])

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
