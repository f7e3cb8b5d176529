"""Fixtures shared by the client's service tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.test_client.test_loader import Processes


@pytest.fixture
def procs() -> Iterator[Processes]:
    """``augserver serve``/``worker`` subprocesses, every one ended after the test."""
    processes = Processes()
    try:
        yield processes
    finally:
        processes.close()
