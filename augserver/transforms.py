"""Preprocessing that runs before AugMix: CIFAR crop and flip, ImageNet random resized crop.

Every random draw comes from the ``numpy.random.Generator`` passed in, in a fixed order, so a
sample's bytes depend only on its source and the generator's state. Outputs are C-contiguous,
writable uint8 ``H x W x 3`` RGB arrays. Nothing here imports torch.

The crop geometry follows torchvision (``RandomCrop(32, padding=4)``, ``RandomResizedCrop``,
``Resize`` + ``CenterCrop``), with numpy draws in place of torch draws. The ImageNet crops are
resampled with one Pillow ``resize(..., box=...)`` call instead of crop-then-resize: identical
except that pixels on the crop's edge may blend in their neighbours just outside the crop.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image

Source = Image.Image | np.ndarray
Preprocess = Callable[[Source, np.random.Generator, int], np.ndarray]
"""A training view: ``(source, rng, size)`` to a ``size`` x ``size`` x 3 uint8 array."""
Box = tuple[float, float, float, float]

CIFAR_CROP = 32
CIFAR_PADDING = 4
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
_RRC_ATTEMPTS = 10
_JPEG_FORMATS = ("JPEG", "MPO")
_DRAFT_SCALES = (8, 4, 2)
# Set on a PIL image that imagenet_* decoded at reduced scale: (full width, full height, scale).
_DRAFT_INFO = "augserver.draft"


# ---------------------------------------------------------------------------- RGB conversion


def _rgb_image(img: Image.Image) -> Image.Image:
    """``img`` as an RGB Pillow image (decodes it); see :func:`to_rgb_array` for the rules."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "I" or mode.startswith("I;16"):
        grey = (np.clip(np.asarray(img), 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        grey = np.nan_to_num(np.asarray(img), nan=0.0).clip(0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        # Direct P -> RGB warns when the transparency is a bytes table; the colours are the same.
        return img.convert("RGBA").convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise ValueError(f"cannot convert Pillow mode {mode!r} to RGB") from exc


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """Decode ``img`` (any Pillow mode) into a writable uint8 ``H x W x 3`` RGB array.

    1, L, P, LA, PA, RGBA, CMYK, YCbCr, ... use Pillow's ``convert("RGB")`` (alpha is dropped,
    not composited onto a background); 16-bit modes (I;16, I;16B, I;16L, I) keep the high byte
    (``>> 8``) instead of clipping; F is clipped to 0..255 and truncated.
    """
    return np.array(_rgb_image(img))


def _rgb_array(array: np.ndarray) -> np.ndarray:
    """A uint8 grey (``H x W`` or ``H x W x 1``), RGB or RGBA array as C-contiguous RGB."""
    if array.dtype != np.uint8:
        raise ValueError(f"image array must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return np.ascontiguousarray(array[:, :, :3])
    raise ValueError(
        f"image array must be H x W, H x W x 1, H x W x 3 or H x W x 4, got shape {array.shape}"
    )


def _as_rgb_array(source: Source) -> np.ndarray:
    if isinstance(source, Image.Image):
        return np.asarray(_rgb_image(source))
    return _rgb_array(np.asarray(source))


def _as_image(source: Source) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    return Image.fromarray(_rgb_array(np.asarray(source)))


def _finish(img: Image.Image, flip: bool) -> np.ndarray:
    """A writable uint8 array of ``img``, mirrored by Pillow when ``flip`` (a negative-stride
    numpy copy of 224 x 224 x 3 costs about 7x more)."""
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.array(img)


# ---------------------------------------------------------------------------- CIFAR


def cifar_train(image: Source, rng: np.random.Generator, size: int = CIFAR_CROP) -> np.ndarray:
    """torchvision ``RandomCrop(size, padding=4)`` (zero padding) then
    ``RandomHorizontalFlip()``; ``size`` is 32 for CIFAR, 64 for Tiny-ImageNet-like data.

    Draws, in order: top in [0, H + 8 - size], left in [0, W + 8 - size], flip when U(0, 1) <
    0.5. The padded image is never built: the overlap of the crop with the source is copied
    into a zeroed ``size`` x ``size`` output, mirrored when flipped.
    """
    src = _as_rgb_array(image)
    height, width = src.shape[:2]
    span_y = height + 2 * CIFAR_PADDING - size
    span_x = width + 2 * CIFAR_PADDING - size
    if span_y < 0 or span_x < 0:
        raise ValueError(f"image {width}x{height} is too small for a padded {size} crop")
    y0 = int(rng.integers(0, span_y, endpoint=True)) - CIFAR_PADDING
    x0 = int(rng.integers(0, span_x, endpoint=True)) - CIFAR_PADDING
    flip = bool(rng.random() < 0.5)

    out = np.zeros((size, size, 3), np.uint8)
    top, bottom = max(y0, 0), min(y0 + size, height)
    left, right = max(x0, 0), min(x0 + size, width)
    rows = slice(top - y0, bottom - y0)
    patch = src[top:bottom, left:right]
    if flip:
        out[rows, size - (right - x0) : size - (left - x0)] = patch[:, ::-1]
    else:
        out[rows, left - x0 : right - x0] = patch
    return out


def cifar_eval(image: Source, size: int = CIFAR_CROP) -> np.ndarray:
    """The evaluation view for CIFAR preprocessing: the centre ``size`` x ``size`` window,
    zero-padded where the image is smaller (the deterministic centre of
    ``RandomCrop(size, padding=4)``): CIFAR's own 32 x 32 test images unchanged."""
    src = _as_rgb_array(image)
    height, width = src.shape[:2]
    out = np.zeros((size, size, 3), np.uint8)
    y0, x0 = (height - size) // 2, (width - size) // 2
    top, left = max(y0, 0), max(x0, 0)
    patch = src[top : min(y0 + size, height), left : min(x0 + size, width)]
    out[top - y0 : top - y0 + patch.shape[0], left - x0 : left - x0 + patch.shape[1]] = patch
    return out


# ---------------------------------------------------------------------------- ImageNet


def random_resized_crop(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = RRC_SCALE,
    ratio: tuple[float, float] = RRC_RATIO,
) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params``: ``(top, left, h, w)`` of the crop.

    Up to 10 attempts, each drawing area fraction U(scale), then log-aspect U(log ratio), then
    (if the crop fits) top and left; otherwise a centred crop clamped to the ratio bounds.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(_RRC_ATTEMPTS):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h, endpoint=True))
            left = int(rng.integers(0, width - w, endpoint=True))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _full_size(img: Image.Image) -> tuple[int, int]:
    """Size of ``img`` before any reduced-scale JPEG decode this module applied."""
    drafted = img.info.get(_DRAFT_INFO)
    return (drafted[0], drafted[1]) if drafted else img.size


def _draft(img: Image.Image, box: Box, size: int) -> int:
    """Ask libjpeg to decode an unloaded JPEG at 1/2, 1/4 or 1/8 scale when ``box`` (in full
    image pixels) still spans at least ``size`` pixels each way at that scale; return the scale.
    """
    drafted = img.info.get(_DRAFT_INFO)
    if drafted:
        return drafted[2]
    if img.format not in _JPEG_FORMATS or len(img.tile) != 1:
        return 1
    box_w, box_h = box[2] - box[0], box[3] - box[1]
    scale = next((s for s in _DRAFT_SCALES if min(box_w, box_h) >= size * s), 1)
    if scale == 1:
        return 1
    full_w, full_h = img.size
    result = img.draft("RGB", (full_w // scale, full_h // scale))
    if result is None:
        return 1
    scale = round(full_w / result[1][2])
    img.info[_DRAFT_INFO] = (full_w, full_h, scale)
    return scale


def _resized_box(img: Image.Image, box: Box, size: int) -> Image.Image:
    """``box`` (full-size pixel coordinates) of ``img`` resampled to ``size`` x ``size``."""
    scale = _draft(img, box, size)
    rgb = _rgb_image(img)
    reduced = (box[0] / scale, box[1] / scale, box[2] / scale, box[3] / scale)
    return rgb.resize((size, size), Image.BILINEAR, box=reduced)


def imagenet_train(source: Source, rng: np.random.Generator, size: int = 224) -> np.ndarray:
    """torchvision ``RandomResizedCrop(size)`` (bilinear) then ``RandomHorizontalFlip()``.

    Draws: the crop (see :func:`random_resized_crop`, from the full image size), then flip when
    U(0, 1) < 0.5. An unloaded JPEG is decoded in place at the coarsest DCT scale (1/2, 1/4,
    1/8) at which the crop still covers ``size`` pixels each way, so a PIL source is consumed:
    pass a freshly opened image (as ``Dataset.read`` returns) for reproducible bytes.
    """
    img = _as_image(source)
    full_w, full_h = _full_size(img)
    top, left, h, w = random_resized_crop(full_h, full_w, rng)
    flip = bool(rng.random() < 0.5)
    return _finish(_resized_box(img, (left, top, left + w, top + h), size), flip)


def eval_resize(width: int, height: int, resize: int = 256) -> tuple[int, int]:
    """torchvision ``Resize(resize)`` output size ``(w, h)``: shorter side to ``resize``."""
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def eval_resize_for(size: int) -> int:
    """The shorter side an evaluation view is resized to before its centre ``size`` crop: the
    usual 256 for 224 (a crop of 0.875), in proportion for other sizes (342 for 299)."""
    return round(size * 256 / 224)


def imagenet_eval(source: Source, size: int = 224, resize: int | None = None) -> np.ndarray:
    """torchvision ``Resize(resize)`` (bilinear) then ``CenterCrop(size)``, in one resample;
    ``resize`` defaults to :func:`eval_resize_for` of ``size``.

    The centre crop of the resized image is mapped back to a box in the source, so the result
    equals resize-then-crop; JPEG sources may be decoded at reduced scale as in training.
    """
    resize = eval_resize_for(size) if resize is None else resize
    if resize < size:
        raise ValueError(f"resize ({resize}) must be at least the crop size ({size})")
    img = _as_image(source)
    full_w, full_h = _full_size(img)
    new_w, new_h = eval_resize(full_w, full_h, resize)
    top = round((new_h - size) / 2.0)
    left = round((new_w - size) / 2.0)
    sx, sy = full_w / new_w, full_h / new_h
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return _finish(_resized_box(img, box, size), flip=False)
