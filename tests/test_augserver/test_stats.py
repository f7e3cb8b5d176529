"""The stats record, the scaling signal and their Prometheus rendering, without a server."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from augserver.addresses import check_endpoint, local_address, parse_host_port
from augserver.config import ConfigError, load_config
from augserver.errors import ProtocolError
from augserver.metrics import escape, render
from augserver.scaling import WAIT_THRESHOLD, StreamMeter, estimate
from augserver.stats import DispatcherStats, StreamStats
from augserver.status import format_status
from client.loader import RemoteAugMixLoader
from tests.service_helpers import make_npz, parse_exposition, write_config

pytestmark = pytest.mark.unit


def hand_made_stats() -> DispatcherStats:
    stream = {"stream": "s1", "samples_per_s": 40.0, "batches_per_s": 10.0, "data_wait": 0.75,
              "epoch": 0, "rank": 0, "world_size": 1, "ordered": False, "delivered": 3,
              "num_batches": 12, "credits": 2, "in_flight": 2, "pending": 7}
    return DispatcherStats.from_dict({
        "uptime_s": 12.5, "address": "tcp://127.0.0.1:5555", "dataset_len": 48,
        "config": {"dataset": "npz:/d.npz"},
        "workers": [
            {"name": 'host"a\\b\nc:1', "state": "ready", "samples_per_s": 20.0,
             "tasks_done": 5, "in_flight": 1, "free_slots": 1, "last_seen_s_ago": 0.1},
            {"name": "host-b:2", "state": "ready", "samples_per_s": 20.0, "tasks_done": 5,
             "in_flight": 1, "free_slots": 1, "last_seen_s_ago": 0.1},
            {"name": "host-c:3", "state": "warming", "samples_per_s": 0.0, "tasks_done": 0,
             "in_flight": 0, "free_slots": 0, "last_seen_s_ago": 0.1},
        ],
        "clients": [{"name": "trainer", "last_seen_s_ago": 0.2, "streams": [stream]}],
        "scaling": dataclasses.asdict(estimate([20.0, 20.0], [StreamStats(**stream)])),
        "counters": {"tasks_reissued": 3, "duplicates_dropped": 1, "samples_failed": 2,
                     "malformed_messages": 4, "handler_errors": 5},
        "recent_failures": [],
    })


# ---------------------------------------------------------------------------- rendering


def test_render_types_values_and_escaping() -> None:
    text = render(hand_made_stats())
    assert text.endswith("\n")
    types, values = parse_exposition(text)
    assert types["augserver_workers"] == "gauge"
    for name in ("tasks_reissued", "duplicates_dropped", "samples_failed", "malformed_messages",
                 "handler_errors"):
        assert types[f"augserver_{name}_total"] == "counter"
    assert values[("augserver_handler_errors_total", "")] == 5
    assert values[("augserver_workers", "")] == 3
    assert values[("augserver_workers_warming", "")] == 1
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


def test_status_shows_warming_workers() -> None:
    text = format_status(hand_made_stats())
    assert "workers: 3 (1 warming up)" in text
    [row] = [line for line in text.splitlines() if "host-c:3" in line]
    assert row.split()[1] == "warming"


@pytest.mark.parametrize(("address", "bind", "problem"), [
    ("tcp://127.0.0.1:99999", True, "port 99999 is not in 0 (any free port), * or 1..65535"),
    ("tcp://127.0.0.1:-5", True, "must be a ZeroMQ address"),
    ("tcp://127.0.0.1:0", False, "port 0 is not in 1..65535"),
    ("tcp://host:*", False, "cannot be *"),
    ("127.0.0.1:5555", False, "the tcp:// is missing"),
    ("localhost", True, "must be a ZeroMQ address"),
])
def test_endpoints_are_checked_with_the_reason(address: str, bind: bool, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        check_endpoint(address, bind=bind)


def test_good_endpoints_pass() -> None:
    for address in ("tcp://*:5555", "tcp://[::1]:7000", "tcp://h:*", "tcp://127.0.0.1:0",
                    "ipc:///tmp/a", "inproc://x"):
        assert check_endpoint(address, bind=True) == address
    assert check_endpoint("tcp://[::1]:65535", bind=False) == "tcp://[::1]:65535"


def test_bad_ports_in_the_job_and_on_the_command_line_name_the_key(tmp_path: Path,
                                                                    capsys: Any) -> None:
    from augserver.cli import main

    data = make_npz(tmp_path, 4)
    with pytest.raises(ConfigError, match=r"bind: .*port 99999"):
        load_config(write_config(tmp_path, data, bind="tcp://127.0.0.1:99999"))
    with pytest.raises(SystemExit):
        main(["status", "--connect", "127.0.0.1:5555"])
    assert "the tcp:// is missing" in capsys.readouterr().err
    with pytest.raises(ValueError, match="port 0"):
        RemoteAugMixLoader("tcp://127.0.0.1:0")


def test_a_stats_record_from_the_wire_is_checked_field_by_field() -> None:
    with pytest.raises(ProtocolError, match=r"stats\.uptime_s: missing"):
        DispatcherStats.from_dict({})
    wire = hand_made_stats().to_dict()
    assert DispatcherStats.from_dict(wire) == hand_made_stats()
    wire["workers"][0]["tasks_done"] = "5"
    with pytest.raises(ProtocolError, match=r"stats.workers\[0\].tasks_done: expected int"):
        DispatcherStats.from_dict(wire)
