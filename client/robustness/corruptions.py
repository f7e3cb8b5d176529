"""CIFAR-10-C / ImageNet-C style corruptions, made locally with numpy, scipy.ndimage and Pillow.

The 15 corruptions of the benchmark (Hendrycks & Dietterich, "Benchmarking Neural Network
Robustness to Common Corruptions and Perturbations", ICLR 2019, arXiv 1903.12261), at five
severities each. The formulas and the per-severity parameter tables follow the authors' generator
scripts in github.com/hendrycks/robustness: ``ImageNet-C/create_c/make_cifar_c.py`` (the
``"cifar"`` table, for 32x32 images) and ``ImageNet-C/create_c/make_imagenet_c.py`` (the
``"imagenet"`` table, for 224x224 crops). The code is a re-implementation: the package
``imagecorruptions`` no longer runs on current scikit-image / NumPy 2, and the originals need
OpenCV and ImageMagick (Wand).

    corrupt(image, "fog", 3, np.random.default_rng(0))          # one HWC uint8 image
    corrupt_images(x, "fog", 3, seed=0)                          # NHWC, one seeded stream per image

The parameter tables are in :mod:`client.robustness.tables`; the cache of whole corrupted sets
in :mod:`client.robustness.cache`; the command line in :mod:`client.programs.corrupt`.

Every random draw comes from the ``numpy.random.Generator`` passed in (``corrupt_images`` gives
image ``i`` its own ``SeedSequence([seed, corruption index, severity, i])``), so the bytes do not
depend on batching. Like the generator scripts, the float result is clipped to [0, 255] and
truncated to uint8 (``np.uint8(...)``).

Where this differs from the originals (besides the random streams, which cannot match):

- motion_blur (and the streaks of snow): the originals call ImageMagick's ``MotionBlurImage``.
  Here the same construction is done directly: a one-sided line kernel of
  ``2 * ceil(radius) + 1`` taps with weights ``exp(-i^2 / (2 sigma^2))`` (normalised), tap ``i``
  at offset ``round(i * (cos a, sin a))`` for the random angle ``a``, edge pixels repeated at the
  border, applied per channel, rounded to uint8 as the PNG round trip did.
- frost: the originals blend a random crop of one of five frost photographs (``frost1..5``;
  the CIFAR script first shrinks them by 0.2). Those photos cannot be shipped or downloaded, so
  five deterministic frost sheets are synthesised instead (fixed seeds, independent of the
  caller's generator): periodic ridged noise for ice veins, rasterised dendrites with
  60-degree side branches for crystals and a low-frequency haze, tinted pale blue. The
  generator picks the sheet and the crop; the blend ``c0 * image + c1 * frost`` uses the
  original weights, and the CIFAR table uses the sheets shrunk by 0.2 as the script did.
  Expect frost errors to track the published CIFAR-10-C / ImageNet-C frost numbers only roughly.
- defocus_blur's anti-aliased disk (``cv2.GaussianBlur`` of an aliased disk, then
  ``cv2.filter2D``), elastic_transform's affine warp (``cv2.getAffineTransform`` /
  ``cv2.warpAffine``, reflect-101 border) and snow's ``cv2.cvtColor(RGB2GRAY)`` are written with
  scipy.ndimage / numpy; cv2's fixed-point bilinear weights are not reproduced, so a pixel can
  differ by one level. Brightness uses the exact closed form of skimage's HSV round trip
  (raise V = max(R, G, B) by ``c``, scale the pixel by the new V over the old one).
- impulse_noise reproduces skimage's ``random_noise(mode="s&p", amount=c)``: each value
  (channel by channel) is replaced with probability ``c``, by 1 or 0 with equal odds.
- Other sizes: both scripts assume square 32 or 224 images. Here any H x W (at least
  ``MIN_SIDE``) works: zooms, crops and the frost crop use H and W separately; fog's plasma
  fractal is made at the next power of two >= max(H, W) (32 and 256 for the two tables, as in
  the originals) and cropped; elastic_transform's table is relative to the image side in the
  originals (``32 * f`` and ``244 * f`` for 224 images), so it is scaled by ``min(H, W)``; every
  other parameter is in pixels and kept as is. ImageNet-C's files were also saved as quality-85
  JPEGs after corrupting; that extra compression is not applied here.
- The originals' quirks are kept: zoom_blur's ``np.arange`` grids (CIFAR severity 1 includes
  1.06), the ``244`` in the ImageNet elastic table, and glass_blur's pixel loop: offsets in
  ``[-d, d - 1]``, and its tuple "swap" of numpy views, which in fact copies the neighbour into
  the pixel and leaves the neighbour unchanged (run in the same order on an index map, then
  applied once, so it stays fast).
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from augserver import preprocessing
from client.robustness.tables import (
    CORRUPTIONS,
    ELASTIC_SCALE,
    FROST_SCALE,
    MOTION_ANGLE,
    PARAMS,
    SEVERITIES,
    SNOW_ANGLE,
    TABLES,
)

MIN_SIDE = 4  # elastic_transform's affine needs three distinct points


# ---------------------------------------------------------------------------------- helpers


def _gaussian(x: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0):
    """skimage.filters.gaussian on an H x W (x C) float image: spatial axes only."""
    sig = (sigma, sigma) + (0.0,) * (x.ndim - 2)
    return ndimage.gaussian_filter(x, sig, mode=mode, truncate=truncate)


def _clipped_zoom(img: np.ndarray, factor: float) -> np.ndarray:
    """Zoom the centre of ``img`` by ``factor`` (>= 1, bilinear) and crop back to its size."""
    h, w = img.shape[:2]
    ch, cw = math.ceil(h / factor), math.ceil(w / factor)
    top, left = (h - ch) // 2, (w - cw) // 2
    zooms = (factor, factor) + (1,) * (img.ndim - 2)
    out = ndimage.zoom(img[top : top + ch, left : left + cw], zooms, order=1)
    trim_top, trim_left = (out.shape[0] - h) // 2, (out.shape[1] - w) // 2
    return out[trim_top : trim_top + h, trim_left : trim_left + w]


def _motion_blur(x: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick's MotionBlurImage on an H x W (x C) float image (see the module docstring)."""
    width = int(2 * math.ceil(radius) + 1)
    taps = np.arange(width, dtype=np.float64)
    kernel = np.exp(-(taps**2) / (2.0 * sigma * sigma))
    kernel /= kernel.sum()
    a = math.radians(angle)
    dx = np.rint(taps * math.cos(a)).astype(np.int64)
    dy = np.rint(taps * math.sin(a)).astype(np.int64)
    h, w = x.shape[:2]
    pad = width - 1
    padded = np.pad(x, ((pad, pad), (pad, pad)) + ((0, 0),) * (x.ndim - 2), mode="edge")
    out = np.zeros(x.shape, dtype=np.float64)
    for k, ox, oy in zip(kernel, dx, dy, strict=True):
        out += k * padded[pad + oy : pad + oy + h, pad + ox : pad + ox + w]
    return out


def _gauss_kernel_1d(size: int, sigma: float) -> np.ndarray:
    """cv2.getGaussianKernel(size, sigma) for sigma > 0."""
    t = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-(t**2) / (2.0 * sigma * sigma))
    return k / k.sum()


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    """The originals' anti-aliased disk kernel, trimmed to its non-zero support."""
    if radius <= 8:
        span, ksize = np.arange(-8, 9), 3
    else:
        r = int(radius)
        span, ksize = np.arange(-r, r + 1), 5
    xx, yy = np.meshgrid(span, span)
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    g = _gauss_kernel_1d(ksize, alias_blur)
    disk = ndimage.correlate1d(disk, g, axis=0, mode="mirror")
    disk = ndimage.correlate1d(disk, g, axis=1, mode="mirror")
    # Zero rows/columns add nothing under correlation; the kernel is symmetric, so trimming
    # the same amount from both sides keeps it centred.
    nz = np.nonzero(disk.any(axis=1))[0]
    cut = int(min(nz[0], len(disk) - 1 - nz[-1]))
    return disk[cut : len(disk) - cut, cut : len(disk) - cut]


def _plasma_fractal(mapsize: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square height map in [0, 1] (the originals' ``plasma_fractal``)."""
    grid = np.empty((mapsize, mapsize), dtype=np.float64)
    grid[0, 0] = 0.0
    step, wibble = mapsize, 100.0
    while step >= 2:
        half = step // 2

        def wibbled(total: np.ndarray, w: float = wibble) -> np.ndarray:
            return total / 4 + w * rng.uniform(-w, w, total.shape)

        corners = grid[0:mapsize:step, 0:mapsize:step]
        squares = corners + np.roll(corners, -1, axis=0)
        squares = squares + np.roll(squares, -1, axis=1)
        grid[half:mapsize:step, half:mapsize:step] = wibbled(squares)
        centres = grid[half:mapsize:step, half:mapsize:step]
        corners = grid[0:mapsize:step, 0:mapsize:step]
        left = centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        grid[0:mapsize:step, half:mapsize:step] = wibbled(left)
        top = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        grid[half:mapsize:step, 0:mapsize:step] = wibbled(top)
        step //= 2
        wibble /= decay
    grid -= grid.min()
    return grid / grid.max()


# ------------------------------------------------------------------------ frost textures

_FROST_SHEETS = 5  # the originals draw randint(5): frost1..frost5
_FROST_SIDE = 512  # full-resolution sheet side (ImageNet scale)


def _periodic_noise(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    """White noise smoothed by a Gaussian of ``sigma`` px with wrap-around, unit variance."""
    spectrum = ndimage.fourier_gaussian(np.fft.rfft2(rng.standard_normal((n, n))), sigma, n=n)
    field = np.fft.irfft2(spectrum, s=(n, n))
    return field / field.std()


def _rasterise(segments: np.ndarray, weights: np.ndarray, n: int) -> np.ndarray:
    """Sum of anti-aliased-ish line segments (x0, y0, x1, y1) on an n x n torus."""
    x0, y0, x1, y1 = segments.T
    counts = np.maximum(2, np.ceil(2 * np.hypot(x1 - x0, y1 - y0)).astype(np.int64))
    seg = np.repeat(np.arange(len(counts)), counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    t = (np.arange(counts.sum()) - starts) / np.repeat(counts - 1, counts)
    xs = np.rint(x0[seg] + t * (x1 - x0)[seg]).astype(np.int64) % n
    ys = np.rint(y0[seg] + t * (y1 - y0)[seg]).astype(np.int64) % n
    return np.bincount(ys * n + xs, weights=0.5 * weights[seg], minlength=n * n).reshape(n, n)


@functools.lru_cache(maxsize=_FROST_SHEETS)
def _frost_base(index: int) -> np.ndarray:
    """Frost sheet ``index`` (0..4): uint8 RGB, _FROST_SIDE square, seamless, deterministic."""
    n = _FROST_SIDE
    rng = np.random.default_rng(np.random.SeedSequence([0x46524F5354, index]))
    # Ice veins: bright where smooth noise fields cross zero, at three scales.
    veins = sum(
        weight * np.exp(-((_periodic_noise(rng, n, sigma) / 0.08) ** 2))
        for sigma, weight in ((28.0, 1.0), (11.0, 0.7), (4.5, 0.45))
    )
    veins /= veins.max()
    # Dendrites: fern-like stems at random angles with side branches at +-60 degrees on both
    # sides, shorter towards the tip; many small ones, a few long ones.
    stems = 420 + 40 * index
    cx, cy = rng.uniform(0, n, stems), rng.uniform(0, n, stems)
    angle = rng.uniform(0, 2 * np.pi, stems)
    length = np.exp(rng.uniform(np.log(6), np.log(80), stems))
    segs = [np.stack([cx, cy, cx + length * np.cos(angle), cy + length * np.sin(angle)], 1)]
    weights = [rng.uniform(0.3, 0.9, stems)]
    per = 12
    t = np.sort(rng.uniform(0.05, 0.95, (stems, per)), axis=1)
    side = np.where(np.arange(per) % 2 == 0, 1.0, -1.0)
    bx = cx[:, None] + t * length[:, None] * np.cos(angle)[:, None]
    by = cy[:, None] + t * length[:, None] * np.sin(angle)[:, None]
    b_angle = angle[:, None] + side * (np.pi / 3)
    b_len = length[:, None] * (1 - t) * rng.uniform(0.15, 0.45, (stems, per))
    branches = np.stack(
        [bx, by, bx + b_len * np.cos(b_angle), by + b_len * np.sin(b_angle)], -1
    ).reshape(-1, 4)
    segs.append(branches)
    weights.append(np.repeat(weights[0], per) * rng.uniform(0.4, 0.8, len(branches)))
    crystals = _rasterise(np.concatenate(segs), np.concatenate(weights), n)
    crystals = ndimage.gaussian_filter(crystals, 0.7, mode="wrap")
    crystals = np.clip(crystals / np.quantile(crystals[crystals > 0], 0.95), 0, 1)
    # Haze: a slowly varying frosted layer.
    haze = _periodic_noise(rng, n, 48.0)
    haze = (haze - haze.min()) / (haze.max() - haze.min())
    fine = _periodic_noise(rng, n, 1.2)
    value = 0.22 + 0.30 * haze + 0.35 * veins + 0.6 * crystals + 0.05 * fine
    value = ndimage.gaussian_filter(np.clip(value, 0, 1), 0.6, mode="wrap")
    tint = np.array([0.80, 0.90, 1.0])
    sheet = np.clip(value[..., None] * tint * 255 + 0.5, 0, 255).astype(np.uint8)
    sheet.setflags(write=False)
    return sheet


@functools.lru_cache(maxsize=32)
def _frost_sheet(index: int, scale: float, min_h: int, min_w: int) -> np.ndarray:
    """Sheet ``index`` shrunk by ``scale`` and tiled (seamlessly) to at least min_h x min_w."""
    sheet = _frost_base(index)
    if scale != 1.0:
        side = max(1, round(_FROST_SIDE * scale))
        sheet = np.asarray(Image.fromarray(sheet).resize((side, side), Image.BILINEAR))
    reps = (-(-min_h // sheet.shape[0]), -(-min_w // sheet.shape[1]), 1)
    if reps != (1, 1, 1):
        sheet = np.tile(sheet, reps)
    sheet = np.ascontiguousarray(sheet)
    sheet.setflags(write=False)
    return sheet


# ------------------------------------------------------------------------------ corruptions
# Each takes the uint8 image, the severity's table entry, the generator and the table name, and
# returns a float image on the 0..255 scale (or uint8).


def _gaussian_noise(img, c, rng, params):
    x = img / 255.0
    return np.clip(x + rng.normal(size=x.shape, scale=c), 0, 1) * 255


def _shot_noise(img, c, rng, params):
    x = img / 255.0
    return np.clip(rng.poisson(x * c) / c, 0, 1) * 255


def _impulse_noise(img, c, rng, params):
    x = img / 255.0
    flipped = rng.random(x.shape) < c
    salted = rng.random(x.shape) < 0.5
    x[flipped & salted] = 1.0
    x[flipped & ~salted] = 0.0
    return x * 255


def _defocus_blur(img, c, rng, params):
    kernel = _disk(radius=c[0], alias_blur=c[1])[..., None]
    return np.clip(ndimage.correlate(img / 255.0, kernel, mode="mirror"), 0, 1) * 255


def _glass_blur(img, c, rng, params):
    sigma, delta, iterations = c
    x = (_gaussian(img / 255.0, sigma) * 255).astype(np.uint8)
    h, w = x.shape[:2]
    rows = np.arange(h - delta, delta, -1)
    cols = np.arange(w - delta, delta, -1)
    if len(rows) and len(cols):
        # The originals' loop reads ``x[h, w], x[h2, w2] = x[h2, w2], x[h, w]``; with numpy
        # views that copies pixel (h2, w2) into (h, w) and leaves (h2, w2) as it is: not a
        # swap. That is what made the published sets, so it is what happens here: the copies
        # run in the same order on an index map (a plain list, fast), then pixels move once.
        hh, ww = np.meshgrid(rows, cols, indexing="ij")
        here = (hh * w + ww).ravel()
        source = list(range(h * w))
        for _ in range(iterations):
            d = rng.integers(-delta, delta, size=(here.size, 2))  # (dx, dy), high exclusive
            there = here + d[:, 1] * w + d[:, 0]
            for a, b in zip(here.tolist(), there.tolist(), strict=True):
                source[a] = source[b]
        x = x.reshape(h * w, -1)[np.asarray(source)].reshape(x.shape)
    return np.clip(_gaussian(x / 255.0, sigma), 0, 1) * 255


def _motion_blur_op(img, c, rng, params):
    angle = rng.uniform(*MOTION_ANGLE)
    return np.clip(np.rint(_motion_blur(img.astype(np.float64), c[0], c[1], angle)), 0, 255)


def _zoom_blur(img, c, rng, params):
    x = (img / 255.0).astype(np.float32)
    factors = np.arange(*c)
    out = np.zeros_like(x)
    for factor in factors:
        out += _clipped_zoom(x, float(factor))
    return np.clip((x + out) / (len(factors) + 1), 0, 1) * 255


def _grey(x: np.ndarray) -> np.ndarray:
    """cv2.cvtColor(x, COLOR_RGB2GRAY) for a float RGB image, keeping a channel axis."""
    return (x @ np.array([0.299, 0.587, 0.114], dtype=x.dtype))[..., None]


def _snow(img, c, rng, params):
    loc, scale, zoom, threshold, radius, sigma, weight = c
    x = img.astype(np.float32) / 255.0
    layer = rng.normal(size=x.shape[:2], loc=loc, scale=scale)
    layer = _clipped_zoom(layer, zoom)
    layer[layer < threshold] = 0
    layer = (np.clip(layer, 0, 1) * 255).astype(np.uint8)  # the originals' L-mode PNG
    angle = rng.uniform(*SNOW_ANGLE)
    streaks = np.rint(_motion_blur(layer.astype(np.float64), radius, sigma, angle))
    streaks = (np.clip(streaks, 0, 255) / 255.0)[..., None]
    x = weight * x + (1 - weight) * np.maximum(x, _grey(x) * 1.5 + 0.5)
    return np.clip(x + streaks + np.rot90(streaks, k=2), 0, 1) * 255


def _frost(img, c, rng, params):
    h, w = img.shape[:2]
    sheet = _frost_sheet(int(rng.integers(_FROST_SHEETS)), FROST_SCALE[params], h + 1, w + 1)
    top = int(rng.integers(0, sheet.shape[0] - h))
    left = int(rng.integers(0, sheet.shape[1] - w))
    frost = sheet[top : top + h, left : left + w]
    return np.clip(c[0] * img.astype(np.float64) + c[1] * frost, 0, 255)


def _fog(img, c, rng, params):
    h, w = img.shape[:2]
    x = img / 255.0
    max_val = x.max()
    mapsize = max(2, 1 << (max(h, w) - 1).bit_length())
    x += c[0] * _plasma_fractal(mapsize, c[1], rng)[:h, :w][..., None]
    return np.clip(x * max_val / (max_val + c[0]), 0, 1) * 255


def _brightness(img, c, rng, params):
    x = img / 255.0
    v = x.max(axis=2, keepdims=True)
    v_new = np.clip(v + c, 0, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(v > 0, x * (v_new / v), v_new)
    return np.clip(out, 0, 1) * 255


def _contrast(img, c, rng, params):
    x = img / 255.0
    means = x.mean(axis=(0, 1), keepdims=True)
    return np.clip((x - means) * c + means, 0, 1) * 255


def _elastic_transform(img, c, rng, params):
    h, w = img.shape[:2]
    side = min(h, w) * ELASTIC_SCALE[params]  # 32 -> 32 (cifar), 224 -> 244 (imagenet)
    alpha, sigma, affine = (f * side for f in c)
    image = img.astype(np.float32) / 255.0
    # Random affine: three points around the centre, each moved by up to `affine` px.
    cx, cy = w // 2, h // 2
    s = min(h, w) // 3
    src = np.array([[cx + s, cy + s], [cx + s, cy - s], [cx - s, cy - s]], dtype=np.float64)
    dst = src + rng.uniform(-affine, affine, size=src.shape).astype(np.float32)
    forward = np.linalg.solve(np.column_stack([src, np.ones(3)]), dst).T  # 2 x 3, x/y order
    inv = np.linalg.inv(np.vstack([forward, [0.0, 0.0, 1.0]]))  # warpAffine maps dst -> src
    matrix, offset = inv[:2, :2][::-1, ::-1], inv[:2, 2][::-1]  # in (row, col) order
    image = np.stack(
        [ndimage.affine_transform(image[..., k], matrix, offset, order=1, mode="mirror")
         for k in range(image.shape[2])], axis=-1,
    )  # fmt: skip
    # Smooth random displacement field.
    dx = (_gaussian(rng.uniform(-1, 1, (h, w)), sigma, "reflect", 3) * alpha).astype(np.float32)
    dy = (_gaussian(rng.uniform(-1, 1, (h, w)), sigma, "reflect", 3) * alpha).astype(np.float32)
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    coords = np.stack([yy + dy, xx + dx])
    out = np.stack(
        [ndimage.map_coordinates(image[..., k], coords, order=1, mode="reflect")
         for k in range(image.shape[2])], axis=-1,
    )  # fmt: skip
    return np.clip(out, 0, 1) * 255


def _pixelate(img, c, rng, params):
    h, w = img.shape[:2]
    small = Image.fromarray(img).resize((max(1, int(w * c)), max(1, int(h * c))), Image.BOX)
    return np.asarray(small.resize((w, h), Image.BOX))


def _jpeg_compression(img, c, rng, params):
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, "JPEG", quality=c)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"))


_Op = Callable[[np.ndarray, Any, np.random.Generator, str], np.ndarray]
_OPS: dict[str, _Op] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "glass_blur": _glass_blur,
    "motion_blur": _motion_blur_op,
    "zoom_blur": _zoom_blur,
    "snow": _snow,
    "frost": _frost,
    "fog": _fog,
    "brightness": _brightness,
    "contrast": _contrast,
    "elastic_transform": _elastic_transform,
    "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
}
assert tuple(_OPS) == CORRUPTIONS


# ------------------------------------------------------------------------------ public API


def default_params(height: int, width: int) -> str:
    """The table used when none is named: the one of the preprocessing that suits images of
    this size (``"cifar"`` up to 64 pixels a side, else ``"imagenet"``)."""
    return preprocessing.for_images(height, width).name


def check_name(name: object) -> str:
    if not isinstance(name, str) or name not in _OPS:
        raise ValueError(f"unknown corruption {name!r}; valid names: {', '.join(CORRUPTIONS)}")
    return name


def check_severity(severity: object) -> int:
    if isinstance(severity, bool) or not isinstance(severity, int | np.integer):
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")
    if int(severity) not in SEVERITIES:
        raise ValueError(f"severity must be in 1..5, got {severity}")
    return int(severity)


def check_params(params: object, height: int, width: int) -> str:
    if params is None:
        return default_params(height, width)
    if params not in PARAMS:
        raise ValueError(f"params must be 'cifar', 'imagenet' or None, got {params!r}")
    return str(params)


def _check_image_shape(shape: tuple[int, ...], what: str) -> None:
    h, w = shape[-3], shape[-2]
    if shape[-1] != 3:
        raise ValueError(f"{what} must have 3 (RGB) channels last, got shape {shape}")
    if h < MIN_SIDE or w < MIN_SIDE:
        raise ValueError(f"{what} must be at least {MIN_SIDE}x{MIN_SIDE} pixels, got {h}x{w}")


def _check_uint8(array: object, what: str, ndim: int, layout: str) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{what} must be a numpy array, got {type(array).__name__}")
    if array.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8, got dtype {array.dtype}")
    if array.ndim != ndim:
        raise ValueError(f"{what} must be {layout}, got shape {array.shape}")
    _check_image_shape(array.shape, what)
    return array


def check_image(image: object) -> np.ndarray:
    """``image`` if it is one uint8 H x W x 3 image of at least :data:`MIN_SIDE` a side."""
    return _check_uint8(image, "image", 3, "H x W x 3 (HWC)")


def check_images(images: object) -> np.ndarray:
    """``images`` if it is a uint8 N x H x W x 3 batch of at least :data:`MIN_SIDE` a side."""
    return _check_uint8(images, "images", 4, "N x H x W x 3 (NHWC)")


def _corrupt(image: np.ndarray, name: str, severity: int, rng, params: str) -> np.ndarray:
    c = TABLES[params][name][severity - 1]
    out = _OPS[name](image, c, rng, params)
    if out.dtype != np.uint8:
        out = np.clip(out, 0, 255).astype(np.uint8)  # truncation, as np.uint8(...) did
    return np.ascontiguousarray(out)


def corrupt(
    image: np.ndarray,
    name: str,
    severity: int,
    rng: np.random.Generator,
    params: str | None = None,
) -> np.ndarray:
    """Corrupt one H x W x 3 uint8 RGB image with corruption ``name`` at ``severity`` (1..5).

    ``params`` picks the parameter table, ``"cifar"`` or ``"imagenet"`` (default: cifar if
    the image side is <= 64). Returns a new uint8 array of the same shape; every random draw
    comes from ``rng``. Raises ValueError for an unknown name, a severity outside 1..5 or an
    image that is not uint8 H x W x 3 (at least ``MIN_SIDE`` pixels a side).
    """
    name = check_name(name)
    severity = check_severity(severity)
    image = check_image(image)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    params = check_params(params, image.shape[0], image.shape[1])
    return _corrupt(np.ascontiguousarray(image), name, severity, rng, params)


def image_rng(seed: int, name: str, severity: int, index: int) -> np.random.Generator:
    """The generator :func:`corrupt_images` uses for image ``index`` of a set."""
    return np.random.default_rng(
        np.random.SeedSequence([seed, CORRUPTIONS.index(name), severity, index])
    )


def corrupt_images(
    images: np.ndarray,
    name: str,
    severity: int,
    seed: int = 0,
    params: str | None = None,
    first_index: int = 0,
) -> np.ndarray:
    """Corrupt every image of an N x H x W x 3 uint8 batch; image ``i`` draws from
    :func:`image_rng` ``(seed, name, severity, first_index + i)``, so results do not depend on
    batching (a chunk starting at image ``k`` of a set passes ``first_index=k``)."""
    name = check_name(name)
    severity = check_severity(severity)
    images = check_images(images)
    params = check_params(params, images.shape[1], images.shape[2])
    out = np.empty_like(images)
    for i in range(len(images)):
        rng = image_rng(seed, name, severity, first_index + i)
        out[i] = _corrupt(np.ascontiguousarray(images[i]), name, severity, rng, params)
    return out


# ------------------------------------------------------------------------------- preview


def preview_grid(
    image: np.ndarray,
    *,
    index: int = 0,
    seed: int = 0,
    params: str | None = None,
    names: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    min_cell: int = 96,
) -> Image.Image:
    """A grid: one row per corruption, the clean image then each severity, with labels.

    ``index`` is the image's index in its set, so the cells equal the cached sets' images.
    """
    image = check_image(image)
    params = check_params(params, image.shape[0], image.shape[1])
    h, w = image.shape[:2]
    zoom = max(1, math.ceil(min_cell / max(h, w)))
    cell_w, cell_h = w * zoom, h * zoom
    label_w, header, pad = 120, 16, 2
    grid = Image.new(
        "RGB",
        (label_w + (len(severities) + 1) * (cell_w + pad), header + len(names) * (cell_h + pad)),
        "white",
    )
    draw = ImageDraw.Draw(grid)
    for col, title in enumerate(["clean", *(f"severity {s}" for s in severities)]):
        draw.text((label_w + col * (cell_w + pad) + 2, 2), title, fill="black")

    def big(a: np.ndarray) -> Image.Image:
        return Image.fromarray(a).resize((cell_w, cell_h), Image.NEAREST)

    for row, name in enumerate(names):
        y = header + row * (cell_h + pad)
        draw.text((4, y + cell_h // 2 - 6), name, fill="black")
        grid.paste(big(image), (label_w, y))
        for col, severity in enumerate(severities, start=1):
            rng = image_rng(seed, name, severity, index)
            out = _corrupt(np.ascontiguousarray(image), name, severity, rng, params)
            grid.paste(big(out), (label_w + col * (cell_w + pad), y))
    return grid
