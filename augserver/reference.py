"""The reference AugMix operations: the Pillow calls of docs/augmix.md, one per op.

This is the ground truth that :mod:`augserver.ops` reproduces byte for byte, written the
way the authors' reference implementation calls Pillow. The tests compare against it and
the kernel benchmark builds its comparator on it; training code should use
:mod:`augserver.ops`, which is much faster.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

PilOp = Callable[[Image.Image, object], Image.Image]


def _affine(img: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=Image.BILINEAR)


PIL_OPS: dict[str, PilOp] = {
    "autocontrast": lambda img, _: ImageOps.autocontrast(img),
    "equalize": lambda img, _: ImageOps.equalize(img),
    "posterize": lambda img, bits: ImageOps.posterize(img, bits),
    "rotate": lambda img, deg: img.rotate(deg, resample=Image.BILINEAR),
    "solarize": lambda img, threshold: ImageOps.solarize(img, threshold),
    "shear_x": lambda img, s: _affine(img, (1, s, 0, 0, 1, 0)),
    "shear_y": lambda img, s: _affine(img, (1, 0, 0, s, 1, 0)),
    "translate_x": lambda img, t: _affine(img, (1, 0, t, 0, 1, 0)),
    "translate_y": lambda img, t: _affine(img, (1, 0, 0, 0, 1, t)),
    "color": lambda img, f: ImageEnhance.Color(img).enhance(f),
    "contrast": lambda img, f: ImageEnhance.Contrast(img).enhance(f),
    "brightness": lambda img, f: ImageEnhance.Brightness(img).enhance(f),
    "sharpness": lambda img, f: ImageEnhance.Sharpness(img).enhance(f),
}
"""Operation name to ``op(pil_image, value) -> pil_image``, exactly as in docs/augmix.md."""


def apply_pil(name: str, image: np.ndarray, value: object = None) -> np.ndarray:
    """Apply the reference Pillow call for ``name`` to a uint8 RGB array."""
    return np.asarray(PIL_OPS[name](Image.fromarray(image), value))
