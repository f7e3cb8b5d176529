"""Installing augserver as the README says: from its git URL, with extras, into an
environment that has its own torch (a real pip and a real git repository)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.service_helpers import REPO

pytestmark = [pytest.mark.service, pytest.mark.slow]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_git_url_builds_a_wheel_with_the_extras_and_no_torch_pin(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    url = f"augserver[client,s3] @ git+file://{clone}"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "w"),
         url], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = (tmp_path / "w").glob("augserver-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        meta = archive.read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "augserver/dispatcher.py" in names and "client/loader.py" in names
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    core = [r for r in requires if "extra ==" not in r]
    assert not any("torch" in r for r in core)  # a worker host never gets torch
    assert any("torch" in r and 'extra == "client"' in r for r in requires)
    assert any("boto3" in r and 'extra == "s3"' in r for r in requires)
    assert any(r.split()[1].startswith("tensorboard") for r in requires)
