"""Shared fixtures: real photos that scikit-image ships, at the sizes AugMix trains on."""

from __future__ import annotations

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
