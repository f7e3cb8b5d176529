"""scikit-learn's handwritten digits as a small real image dataset: shipped, never downloaded.

1797 real 8x8 scans, upscaled to 32x32 RGB: the data of the quickstart and of the study.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as 32x32 RGB uint8 images (N, 32, 32, 3) and int64 labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(g).resize((32, 32), Image.BILINEAR)) for g in grey])
    return np.repeat(big[..., None], 3, axis=3), digits.target.astype(np.int64)


def digits_npz(path: Path) -> Path:
    """scikit-learn's digits (:func:`digits_arrays`) in an ``.npz`` (x, y)."""
    x, y = digits_arrays()
    np.savez(path, x=x, y=y)
    return path


def digits_split(
    seed: int = 0, test_fraction: float = 0.2
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The digits (32x32 RGB uint8) split stratified by class: x_train, y_train, x_test, y_test."""
    from sklearn.model_selection import train_test_split

    x, y = digits_arrays()
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed
    )
    return x_train, y_train, x_test, y_test
