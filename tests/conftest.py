"""Shared fixtures: real photos that scikit-image ships, at the sizes AugMix trains on, and a
shared-memory directory of a test's own."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image


def resized(photo: np.ndarray, width: int, height: int) -> np.ndarray:
    """A real photo resized with Pillow to ``width`` x ``height`` (uint8 RGB)."""
    return np.asarray(Image.fromarray(photo).resize((width, height), Image.BILINEAR))


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Real photos at 32x32 (CIFAR), 224x224 (ImageNet) and a non-square 61x40."""
    return {
        "astronaut32": resized(skimage.data.astronaut(), 32, 32),
        "coffee224": resized(skimage.data.coffee(), 224, 224),
        "chelsea61x40": resized(skimage.data.chelsea(), 61, 40),
    }


@pytest.fixture
def shm_directory() -> Iterator[Path]:
    """A directory of the test's own in /dev/shm (tmpfs, as in production), removed after."""
    path = Path("/dev/shm") / f"augserver-test-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield path
    finally:
        for name in os.listdir(path):
            os.unlink(path / name)
        path.rmdir()


LANES = ("unit", "service")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test is in exactly one lane: ``unit`` (in-process, no servers, the fast lane:
    ``pytest -m unit``) or ``service`` (starts dispatchers, workers or other processes);
    ``slow`` marks the longest service tests."""
    for item in items:
        lanes = [lane for lane in LANES if item.get_closest_marker(lane)]
        if len(lanes) != 1:
            raise pytest.UsageError(
                f"{item.nodeid}: needs exactly one of the markers {', '.join(LANES)}, has {lanes}")
