"""Local workers: they start from any folder, and one that keeps dying at start is reported
with its reason in the log and in ``status``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from augserver.status import request_status
from client.loader import RemoteAugMixLoader
from tests.service_helpers import REPO, end_process, free_port, make_npz, wait_for, write_config

pytestmark = pytest.mark.service


def serve_from(folder: Path, config: Path, address: str, env: dict[str, str],
               log: Path) -> subprocess.Popen[bytes]:
    """``augserver serve --workers 1`` started in ``folder`` (as its console script runs:
    the working directory not on sys.path), output to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-P", "-m", "augserver", "serve", "--config", str(config),
             "--bind", address, "--workers", "1", "--log-level", "INFO"],
            cwd=folder, env={**env, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"},
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def test_workers_start_from_a_folder_that_holds_a_folder_named_augserver(tmp_path: Path) -> None:
    shadow = tmp_path / "augserver"  # say, the folder a clone sits in, or an old copy
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('the wrong augserver')\n")
    config = write_config(tmp_path, make_npz(tmp_path, 8))
    address = f"tcp://127.0.0.1:{free_port()}"
    serve = serve_from(tmp_path, config, address, dict(os.environ), tmp_path / "serve.log")
    try:
        loader = RemoteAugMixLoader(address, timeout=60)
        assert len(next(iter(loader))) == 4
    finally:
        end_process(serve)
    assert "the wrong augserver" not in (tmp_path / "serve.log").read_text()


def test_a_worker_that_keeps_dying_at_start_is_reported_with_its_reason(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        "if 'worker' in sys.argv:\n"
        "    raise SystemExit('worker start-up failed: the test broke it on purpose')\n")
    config = write_config(tmp_path, make_npz(tmp_path, 8))
    address = f"tcp://127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONPATH": str(site)}
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        serve = subprocess.Popen(
            [sys.executable, "-m", "augserver", "serve", "--config", str(config), "--bind",
             address, "--workers", "1", "--log-level", "INFO"],
            cwd=REPO, env={**env, "PYTHONPATH": f"{site}{os.pathsep}{REPO}"}, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        stats = wait_for(lambda: (s := request_status(address, 2.0)) and s.problems and s, 30,
                         "a problem in the status")
        [problem] = stats.problems
        assert "keeps dying at start" in problem and "broke it on purpose" in problem
        assert stats.workers == []
    finally:
        end_process(serve)
    text = log.read_text()
    assert "times in a row at start" in text and "broke it on purpose" in text


def test_the_reason_quoted_is_recent_and_names_a_crash() -> None:
    """An old line is never quoted as why a worker died; a crash report (faulthandler's)
    is quoted with the crashing thread's innermost frame."""
    from augserver.supervisor import last_words

    old = [(0.0, "INFO worker joined")]
    assert last_words(old, died=500.0) == "it printed nothing in its last 10 s"
    crash = [*old, (499.0, "Fatal Python error: Segmentation fault"),
             (499.0, 'Thread 0x1 (most recent call first):'),
             (499.0, 'File "/x/other.py", line 3 in wait'),
             (499.0, "Current thread 0x2 (most recent call first):"),
             (499.0, 'File "/x/worker.py", line 9 in _fill_sample')]
    reason = last_words(crash, died=500.0)
    assert reason.startswith("Fatal Python error: Segmentation fault")
    assert "worker.py" in reason and "other.py" not in reason
    assert last_words([*old, (499.5, "ValueError: bad")], 500.0) == "its last line: ValueError: bad"
