"""A dispatcher with local workers as a subprocess, for single-host runs, demos and tests.

    from client.programs.local_server import local_server

    job = {"dataset": {"format": "npz", "path": "train.npz"}, "preprocess": "cifar"}
    with local_server(job, workers=2) as address:           # tcp://127.0.0.1:<free port>
        loader = RemoteAugMixLoader(address)
        ...

It runs ``python -m augserver serve --config JOB --bind tcp://127.0.0.1:PORT --workers N`` in
its own process group, waits until the dispatcher listens (or raises with its exit status
when it dies first), and on exit terminates it (SIGTERM, then SIGKILL to the whole group).
On Linux the dispatcher also gets SIGTERM when the process that started it dies.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from augserver.config import config_from_dict
from augserver.supervisor import augserver_command, dies_with_parent

__all__ = ["free_port", "local_server"]

_START_TIMEOUT = 60.0
_STOP_GRACE = 15.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_job(job: dict[str, Any], folder: Path) -> Path:
    """``job`` validated (errors name the key) and written as YAML, with the dataset path made
    absolute (a relative one would otherwise be relative to the temporary file)."""
    job = dict(job)
    dataset = dict(job.get("dataset") or {})
    if isinstance(dataset.get("path"), str | os.PathLike):
        dataset["path"] = os.path.abspath(os.path.expanduser(os.fspath(dataset["path"])))
        job["dataset"] = dataset
    config_from_dict(job, source="local_server job")
    path = folder / "augserver.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def _wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"augserver serve exited with status {proc.returncode} before listening "
                "(its error is printed above)"
            )
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"augserver serve did not listen on port {port} in {timeout:g} s")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()  # the dispatcher stops its own workers
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=_STOP_GRACE)
    # whatever is left of its process group (a worker that did not stop), then reap
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def local_server(
    config: dict[str, Any] | str | os.PathLike[str], workers: int, *, log_level: str = "WARNING"
) -> Iterator[str]:
    """Serve ``config`` (a job dict, or a YAML file) on a free loopback port with ``workers``
    local worker processes; yield the address (``tcp://127.0.0.1:PORT``); stop it on exit."""
    with tempfile.TemporaryDirectory(prefix="augserver-local-") as tmp:
        path = _write_job(config, Path(tmp)) if isinstance(config, dict) else Path(config)
        port = free_port()
        address = f"tcp://127.0.0.1:{port}"
        command, env = augserver_command("serve", "--config", str(path), "--bind", address,
                                         "--workers", str(workers), "--log-level", log_level)
        proc = subprocess.Popen(command, env=env, start_new_session=True,
                                preexec_fn=dies_with_parent())
        try:
            _wait_listening(proc, port, _START_TIMEOUT)
            yield address
        finally:
            _stop(proc)
