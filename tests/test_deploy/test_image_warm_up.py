"""The kernels' warm-up as the container image and scripts/setup.sh run it: it compiles into
the cache it names, and a second run loads from that cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_deploy.test_deploy import warm_up_command

pytestmark = pytest.mark.service


def test_the_images_warm_up_compiles_once_into_its_cache(tmp_path: Path) -> None:
    cache = tmp_path / "numba"
    argv = [sys.executable, "-m", "augserver", *warm_up_command()[1:]]
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    is_warm = [sys.executable, "-c", "from augserver.kernels_cache import is_warm; "
               "print(is_warm())"]
    assert subprocess.run(is_warm, env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
    first = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr
    assert "AugMix kernels compiled in" in first.stdout and str(cache) in first.stdout
    assert any(cache.rglob("*.nbi")), "no compiled kernel in the cache"
    assert subprocess.run(is_warm, env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "True"
    again = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert "AugMix kernels loaded from the cache in" in again.stdout


def test_setup_warms_the_kernels_after_installing() -> None:
    from tests.service_helpers import REPO

    lines = (REPO / "scripts" / "setup.sh").read_text().splitlines()
    install = max(i for i, line in enumerate(lines) if "pip install" in line)
    assert any("augserver warm-up" in line for line in lines[install + 1:])
