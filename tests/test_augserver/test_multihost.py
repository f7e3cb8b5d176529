"""Many hosts for real: the dispatcher, two workers and the trainer in network namespaces.

Four namespaces stand for four hosts. The dispatcher host has a veth link to each other
host (10.213.K.1 on its side, 10.213.K.2 on host K's), so every byte crosses a real network
interface and a worker host can be cut off with ``ip link set ... down``. The addresses exist
only inside namespaces this test creates and deletes; nothing is configured outside them.
Skipped where namespaces cannot be made (not root, no ``ip``, no permission).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import pytest

from augserver.plan import ShardPlan
from augserver.stats import DispatcherStats
from tests.service_helpers import REPO, end_process, make_npz, wait_for, write_config

pytestmark = [pytest.mark.service, pytest.mark.slow]

PORT = 5555
N, BATCH = 96, 4  # 24 batches per epoch
HOSTS = ("disp", "w1", "w2", "client")  # host K (K >= 1) is reached over link K
_serial = count()

CLIENT = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from client import RemoteAugMixLoader

    address, out, control = sys.argv[1], sys.argv[2], Path(sys.argv[4])
    pause_after = int(sys.argv[3])
    loader = RemoteAugMixLoader(address, prefetch=8, timeout=60, normalize=False)
    seen = []
    for step, batch in enumerate(loader, 1):
        seen += batch.index.tolist()
        if step == pause_after:  # hold 8 batches, no credit out: then wait for the cut
            (control / "paused").touch()
            deadline = time.monotonic() + 30
            while not (control / "resume").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
    Path(out).write_text(json.dumps(seen))
""")


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


@dataclass
class Hosts:
    """The namespaces (``name`` by host) and every process started in them."""

    names: dict[str, str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def address(self, host: str) -> str:
        """Where ``host`` reaches the dispatcher."""
        return f"tcp://10.213.{HOSTS.index(host)}.1:{PORT}"

    def start(self, host: str, *args: str, log: Path) -> subprocess.Popen[bytes]:
        """``python ARGS`` inside ``host``'s namespace (its own process group)."""
        out = log.open("ab")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.names[host], sys.executable, *args], cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}, stdout=out,
            stderr=out, start_new_session=True,
        )
        out.close()
        self.procs.append(proc)
        return proc

    def status(self) -> DispatcherStats | None:
        """The dispatcher's stats, asked from its own host over loopback (``status --json``)."""
        result = subprocess.run(
            ["ip", "netns", "exec", self.names["disp"], sys.executable, "-m", "augserver",
             "status", "--json", "--timeout", "2", "--connect", f"tcp://127.0.0.1:{PORT}"],
            cwd=REPO, capture_output=True, text=True, timeout=30,
        )
        if result.returncode != 0:
            return None
        return DispatcherStats.from_dict(json.loads(result.stdout))

    def cut(self, host: str) -> None:
        """Pull ``host``'s cable: its end of the link goes down."""
        k = HOSTS.index(host)
        result = _ip("-n", self.names[host], "link", "set", f"h{k}", "down")
        assert result.returncode == 0, result.stderr


def _build(names: dict[str, str]) -> None:
    """Namespaces with loopback up, and a veth link from the dispatcher to every other host."""
    for name in names.values():
        result = _ip("netns", "add", name)
        if result.returncode != 0:
            pytest.skip(f"network namespaces cannot be made here: {result.stderr.strip()}")
        _check(_ip("-n", name, "link", "set", "lo", "up"))
    disp = names["disp"]
    for k, host in enumerate(HOSTS[1:], 1):
        other = names[host]
        _check(_ip("link", "add", f"d{k}", "netns", disp, "type", "veth",
                   "peer", "name", f"h{k}", "netns", other))
        _check(_ip("-n", disp, "addr", "add", f"10.213.{k}.1/24", "dev", f"d{k}"))
        _check(_ip("-n", other, "addr", "add", f"10.213.{k}.2/24", "dev", f"h{k}"))
        _check(_ip("-n", disp, "link", "set", f"d{k}", "up"))
        _check(_ip("-n", other, "link", "set", f"h{k}", "up"))


def _check(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"{' '.join(result.args)}: {result.stderr.strip()}"


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    """Four hosts; their processes are killed and namespaces (with their links) deleted."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("the ip command (iproute2) is not installed")
    serial = next(_serial)
    names = {host: f"augs{os.getpid()}-{serial}-{host}" for host in HOSTS}
    made = Hosts(names)
    try:
        _build(names)
        yield made
    finally:
        for proc in made.procs:
            end_process(proc, grace=2.0)
        for name in names.values():  # deleting a namespace deletes its veth ends
            _ip("netns", "delete", name)


def _start_job(hosts: Hosts, tmp_path: Path) -> None:
    """The dispatcher on its host and a worker on each worker host, all connected."""
    # 224 px views: a batch takes a worker tens of ms, far longer than the client takes to
    # eat one from its buffer, so a burst of credits spreads over both workers.
    config = write_config(tmp_path, make_npz(tmp_path, N, side=64), batch_size=BATCH, seed=3,
                          preprocess="imagenet",
                          limits={"heartbeat_interval": 0.2, "heartbeat_misses": 3},
                          security={"insecure": True})  # the test's own namespaced network
    log = tmp_path / "services.log"
    hosts.start("disp", "-m", "augserver", "serve", "--config", str(config), "--bind",
                f"tcp://0.0.0.0:{PORT}", "--workers", "0", "--log-level", "WARNING", log=log)
    for host in ("w1", "w2"):
        hosts.start(host, "-m", "augserver", "worker", "--connect", hosts.address(host),
                    "--log-level", "WARNING", log=log)

    def ready() -> bool:
        workers = stats.workers if (stats := hosts.status()) else []
        return len(workers) == 2 and all(w.free_slots + w.in_flight for w in workers)

    wait_for(ready, 30, "two workers on their own hosts", interval=0.2)


def _run_client(hosts: Hosts, tmp_path: Path, pause_after: int = 0) -> subprocess.Popen[bytes]:
    script = tmp_path / "trainer.py"
    script.write_text(CLIENT)
    args = [str(script), hosts.address("client"), str(tmp_path / "seen.json"), str(pause_after),
            str(tmp_path)]
    return hosts.start("client", *args, log=tmp_path / "client.log")


def _received(proc: subprocess.Popen[bytes], tmp_path: Path) -> list[int]:
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(60)
    log = (tmp_path / "client.log").read_text()
    assert proc.returncode == 0, f"the client failed (rc {proc.returncode}):\n{log}"
    return json.loads((tmp_path / "seen.json").read_text())


def _epoch() -> list[int]:
    return sorted(ShardPlan(3, 0, N, 0, 1, BATCH).indices.tolist())


def test_full_epoch_across_hosts_arrives_exactly_once(hosts: Hosts, tmp_path: Path) -> None:
    _start_job(hosts, tmp_path)
    seen = _received(_run_client(hosts, tmp_path), tmp_path)
    assert sorted(seen) == _epoch() and len(seen) == len(set(seen)) == N
    stats = hosts.status()
    assert stats is not None
    workers = stats.workers
    assert [w.tasks_done > 0 for w in workers] == [True, True], "both hosts served tasks"


def test_worker_host_cut_off_mid_epoch_still_exactly_once(
    hosts: Hosts, tmp_path: Path
) -> None:
    _start_job(hosts, tmp_path)
    client = _run_client(hosts, tmp_path, pause_after=4)
    wait_for(lambda: (tmp_path / "paused").exists() or client.poll() is not None, 60,
             "the client to pause mid-epoch")
    # The client holds a full buffer and no credit is out. Cut w1, then let the client go:
    # its 8 credits reach the dispatcher within a few ms, well before w1 is missed, so w1
    # gets tasks it never answers; after 0.6 s of silence it is declared dead and they
    # are re-issued to w2.
    hosts.cut("w1")
    (tmp_path / "resume").touch()
    start = time.monotonic()
    seen = _received(client, tmp_path)
    assert sorted(seen) == _epoch() and len(seen) == len(set(seen)) == N
    stats = hosts.status()
    assert stats is not None
    assert len(stats.workers) == 1, "the cut-off worker is gone"
    assert stats.counters.tasks_reissued >= 1
    assert time.monotonic() - start < 30
