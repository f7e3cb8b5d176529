"""The AugMix operations, bit-exact with the reference Pillow calls (docs/augmix.md).

Each operation works on a ``uint8`` RGB array of shape ``(height, width, 3)`` and returns a
new array of the same shape. :func:`apply` takes the concrete parameter (degrees, bits,
threshold, shear factor, pixel offset or enhance factor); :func:`sample` draws that parameter
from a severity exactly as the reference does. The pixels are computed by compiled kernels
(:mod:`augserver._kernels`) that reproduce Pillow's arithmetic, so ``apply`` returns the very
bytes of the Pillow call for every value the sampler can produce.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from augserver import _kernels
from augserver.op_names import ALL_OPS, EXTRA_OPS, OP_CODES, SIGNED_OPS

Value = int | float | None
Size = tuple[int, int]


def int_param(level: float, maxval: float) -> int:
    """``int(level * maxval / 10)``: the reference's integer magnitude (truncates)."""
    return int(level * maxval / 10)


def float_param(level: float, maxval: float) -> float:
    """``level * maxval / 10``: the reference's float magnitude."""
    return float(level) * maxval / 10


def op_value(name: str, level: float, negate: bool, size: Size) -> Value:
    """The concrete parameter of ``name`` for a drawn ``level`` and sign, as the reference.

    ``size`` is ``(width, height)``: translate_x scales with the width, translate_y with the
    height (the reference's IMAGE_SIZE for square crops).
    """
    if name in ("autocontrast", "equalize"):
        return None
    if name == "posterize":
        return 4 - int_param(level, 4)
    if name == "solarize":
        return 256 - int_param(level, 256)
    if name == "rotate":
        value: int | float = int_param(level, 30)
    elif name in ("shear_x", "shear_y"):
        value = float_param(level, 0.3)
    elif name == "translate_x":
        value = int_param(level, size[0] / 3)
    elif name == "translate_y":
        value = int_param(level, size[1] / 3)
    elif name in EXTRA_OPS:
        return float_param(level, 1.8) + 0.1
    else:
        raise ValueError(_unknown(name))
    return -value if negate else value


def sample(name: str, rng: np.random.Generator, severity: float, size: Size) -> Value:
    """Draw the parameter of ``name`` at ``severity`` from ``rng`` as the reference does.

    ``level = Uniform(0.1, severity)``; signed operations then negate their value when a
    second ``Uniform(0, 1)`` draw exceeds 0.5. autocontrast and equalize draw nothing.
    """
    _check_name(name)
    if name in ("autocontrast", "equalize"):
        return None
    level = rng.uniform(0.1, severity)
    negate = name in SIGNED_OPS and rng.uniform() > 0.5
    return op_value(name, level, negate, size)


@lru_cache(maxsize=4096)
def rotate_matrix(degrees: float, width: int, height: int) -> tuple[float, ...]:
    """The inverse affine matrix ``Image.rotate(degrees)`` hands to ``Image.transform``.

    Written as Pillow computes it (angle modulo 360, cos/sin rounded to 15 digits, rotation
    about the image centre) so the doubles, and therefore the pixels, are identical.
    """
    angle = -math.radians(degrees % 360.0)
    cos = round(math.cos(angle), 15)
    sin = round(math.sin(angle), 15)
    msin = round(-math.sin(angle), 15)
    cx, cy = width / 2, height / 2
    c = cos * -cx + sin * -cy + 0.0
    f = msin * -cx + cos * -cy + 0.0
    return (cos, sin, c + cx, msin, cos, f + cy)


def op_params(name: str, value: Value, size: Size) -> tuple[float, ...]:
    """The six kernel parameters of ``name`` with ``value``: an affine matrix or the value."""
    if name == "rotate":
        return rotate_matrix(value, size[0], size[1])
    if name == "shear_x":
        return (1.0, value, 0.0, 0.0, 1.0, 0.0)
    if name == "shear_y":
        return (1.0, 0.0, 0.0, value, 1.0, 0.0)
    if name == "translate_x":
        return (1.0, 0.0, value, 0.0, 1.0, 0.0)
    if name == "translate_y":
        return (1.0, 0.0, 0.0, 0.0, 1.0, value)
    return (0.0 if value is None else float(value), 0.0, 0.0, 0.0, 0.0, 0.0)


def apply(name: str, image: np.ndarray, value: Value = None) -> np.ndarray:
    """Apply operation ``name`` with its concrete ``value`` to a uint8 RGB image.

    The result has the bytes of the reference Pillow call (see docs/augmix.md). ``value`` is
    degrees (rotate), bits 1..8 (posterize), threshold (solarize), shear factor, pixel offset
    (translate), enhance factor (color/contrast/brightness/sharpness), or None for
    autocontrast and equalize.
    """
    _check_name(name)
    src = check_image(image)
    _check_value(name, value)
    if name == "rotate":
        quick = _rotate_fast_path(src, value)
        if quick is not None:
            return quick
    size = (src.shape[1], src.shape[0])
    params = np.asarray(op_params(name, value, size), dtype=np.float64)
    dst = np.empty_like(src)
    _kernels.apply_op(OP_CODES[name], params, src, dst, np.empty_like(src))
    return dst


def check_image(image: np.ndarray) -> np.ndarray:
    """Return ``image`` as a writable C-contiguous uint8 ``(H, W, 3)`` array, or raise."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"image must be uint8 with shape (height, width, 3), got {image.dtype} "
            f"{image.shape}"
        )
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must not be empty, got shape {image.shape}")
    if image.flags.c_contiguous and image.flags.writeable:
        return image
    return np.array(image, order="C")


def _rotate_fast_path(image: np.ndarray, degrees: float) -> np.ndarray | None:
    """Pillow's ``rotate`` shortcuts: copies and transposes instead of resampling."""
    angle = degrees % 360.0
    if angle == 0:
        return image.copy()
    if angle == 180:
        return np.ascontiguousarray(image[::-1, ::-1])
    if angle in (90, 270) and image.shape[0] == image.shape[1]:
        return np.ascontiguousarray(np.rot90(image, 1 if angle == 90 else -1))
    return None


def _check_name(name: str) -> None:
    if name not in OP_CODES:
        raise ValueError(_unknown(name))


def _check_value(name: str, value: Value) -> None:
    if name in ("autocontrast", "equalize"):
        if value is not None:
            raise ValueError(f"{name} takes no value, got {value!r}")
        return
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name} needs a numeric value, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} value must be finite, got {value!r}")
    if name in ("posterize", "solarize") and int(value) != value:
        raise ValueError(f"{name} value must be an integer, got {value!r}")
    if name == "posterize" and not 1 <= value <= 8:
        raise ValueError(f"posterize bits must be between 1 and 8, got {value!r}")
    if name in EXTRA_OPS and value < 0:
        raise ValueError(f"{name} factor must be >= 0, got {value!r}")


def _unknown(name: str) -> str:
    return f"unknown AugMix operation {name!r}; expected one of {ALL_OPS}"
