"""The container image's kernel warm-up, run for real: it compiles into the cache it names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_deploy.test_deploy import warm_up_snippet

pytestmark = pytest.mark.service


def test_the_images_warm_up_step_runs_and_fills_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "numba"
    done = subprocess.run([sys.executable, "-c", warm_up_snippet()], cwd=tmp_path,
                          env={**os.environ, "NUMBA_CACHE_DIR": str(cache)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"numba kernels cached in {cache}" in done.stdout
    assert any(cache.rglob("*.nbi")), "no compiled kernel in the cache"
