"""The AugMix operation names and their kernel codes: the one place they are enumerated.

Light on purpose (no numba, no numpy): the job configuration checks names against it, and the
compiled kernels (:mod:`augserver._kernels`) take their codes from it.
"""

from __future__ import annotations

OPS: tuple[str, ...] = (
    "autocontrast",
    "equalize",
    "posterize",
    "rotate",
    "solarize",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
)
"""The nine default operations (no overlap with the ImageNet-C corruptions), reference order."""

EXTRA_OPS: tuple[str, ...] = ("color", "contrast", "brightness", "sharpness")
"""The four ``all_ops`` extras, which overlap ImageNet-C."""

ALL_OPS: tuple[str, ...] = OPS + EXTRA_OPS

OP_CODES: dict[str, int] = {name: code for code, name in enumerate(ALL_OPS)}
"""Operation name to kernel code (the index in :data:`ALL_OPS`)."""

SIGNED_OPS = frozenset({"rotate", "shear_x", "shear_y", "translate_x", "translate_y"})
"""Operations whose value is negated when ``Uniform(0, 1) > 0.5``."""
