"""Preprocessing before AugMix: torchvision crop rules, determinism, draft decoding, RGB modes."""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from augserver.preprocessing import PREPROCESSINGS, preprocess
from augserver.transforms import (
    cifar_eval,
    cifar_train,
    eval_resize,
    eval_resize_for,
    imagenet_eval,
    imagenet_train,
    random_resized_crop,
    to_rgb_array,
)

pytestmark = pytest.mark.unit

DRAFT_INFO = "augserver.draft"


def photo(name: str, width: int, height: int) -> np.ndarray:
    """A real scikit-image photo resized to ``width`` x ``height``."""
    img = Image.fromarray(getattr(skimage.data, name)())
    return np.asarray(img.resize((width, height), Image.BILINEAR))


def column_ramp(width: int, height: int) -> np.ndarray:
    """Each column holds 10 + its x coordinate (mod 240), so direction reveals a flip."""
    ramp = (10 + np.arange(width) % 240).astype(np.uint8)
    return np.repeat(np.broadcast_to(ramp[None, :, None], (height, width, 1)), 3, axis=2)


def jpeg_bytes(array: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def is_flipped(row: np.ndarray) -> bool:
    """Whether a row of a crop of :func:`column_ramp` runs right to left."""
    values = row[row > 0].astype(int)
    return bool(values[0] > values[-1])


@pytest.fixture(scope="module")
def cifar_photo() -> np.ndarray:
    return photo("astronaut", 32, 32)


@pytest.fixture(scope="module")
def imagenet_photo() -> np.ndarray:
    return photo("chelsea", 500, 375)


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    """A 2048 x 1536 JPEG of a real photo."""
    return jpeg_bytes(photo("coffee", 2048, 1536))


# ---------------------------------------------------------------------------- CIFAR


def cifar_reference(image: np.ndarray, seed: int) -> np.ndarray:
    """RandomCrop(32, padding=4) + flip the obvious way: np.pad, slice, mirror."""
    rng = np.random.default_rng(seed)
    height, width = image.shape[:2]
    top = rng.integers(0, height + 8 - 32, endpoint=True)
    left = rng.integers(0, width + 8 - 32, endpoint=True)
    flip = rng.random() < 0.5
    crop = np.pad(image, ((4, 4), (4, 4), (0, 0)))[top : top + 32, left : left + 32]
    return crop[:, ::-1] if flip else crop


@pytest.mark.parametrize("shape", [(32, 32), (40, 36), (24, 30)])
def test_cifar_train_equals_pad_then_slice(shape: tuple[int, int]) -> None:
    image = photo("astronaut", shape[1], shape[0])
    for seed in range(200):
        out = cifar_train(image, np.random.default_rng(seed))
        np.testing.assert_array_equal(out, cifar_reference(image, seed), err_msg=f"seed {seed}")


def test_cifar_train_output_and_determinism(cifar_photo: np.ndarray) -> None:
    out = cifar_train(cifar_photo, np.random.default_rng(7))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out.flags.c_contiguous and out.flags.writeable
    again = cifar_train(cifar_photo, np.random.default_rng(7))
    assert out.tobytes() == again.tobytes()
    distinct = {cifar_train(cifar_photo, np.random.default_rng(s)).tobytes() for s in range(50)}
    assert len(distinct) > 40
    pil = cifar_train(Image.fromarray(cifar_photo), np.random.default_rng(7))
    np.testing.assert_array_equal(pil, out)


def test_cifar_train_covers_all_offsets_and_flips_half_the_time() -> None:
    image = column_ramp(32, 32)
    flips, zero_rows, zero_cols = 0, set(), set()
    for seed in range(200):
        out = cifar_train(image, np.random.default_rng(seed))
        flips += is_flipped(out[16])
        zero_rows.add(int((out[:, 16, 0] == 0).sum()))
        zero_cols.add(int((out[16, :, 0] == 0).sum()))
    assert 70 <= flips <= 130  # Binomial(200, 0.5): mean 100, sd 7
    assert zero_rows == zero_cols == set(range(5))  # padding shown: 0..4 rows / columns


def test_cifar_train_rejects_bad_input() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="too small"):
        cifar_train(np.zeros((20, 32, 3), np.uint8), rng)
    with pytest.raises(ValueError, match="uint8"):
        cifar_train(np.zeros((32, 32, 3), np.float32), rng)


# ---------------------------------------------------------------------------- RandomResizedCrop


def torchvision_get_params(height: int, width: int, seed: int) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, transcribed with numpy draws."""
    rng = np.random.default_rng(seed)
    area = height * width
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target_area = area * rng.uniform(0.08, 1.0)
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect_ratio))
        h = round(math.sqrt(target_area / aspect_ratio))
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < 3 / 4:
        w = width
        h = round(w / (3 / 4))
    elif in_ratio > 4 / 3:
        h = height
        w = round(h * (4 / 3))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("size", [(375, 500), (500, 375), (64, 64), (30, 200)])
def test_random_resized_crop_matches_torchvision_rule(size: tuple[int, int]) -> None:
    height, width = size
    for seed in range(300):
        got = random_resized_crop(height, width, np.random.default_rng(seed))
        assert got == torchvision_get_params(height, width, seed), seed


def test_random_resized_crop_statistics() -> None:
    height, width = 375, 500
    crops = [random_resized_crop(height, width, np.random.default_rng(s)) for s in range(500)]
    fractions = np.array([h * w / (height * width) for _, _, h, w in crops])
    aspects = np.array([w / h for _, _, h, w in crops])
    assert fractions.min() > 0.07 and fractions.max() <= 1.0
    assert 0.3 < np.median(fractions) < 0.7  # U(0.08, 1) truncated to crops that fit
    assert aspects.min() > 0.7 and aspects.max() < 1.4
    for top, left, h, w in crops:
        assert 0 <= top <= height - h and 0 <= left <= width - w


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [(1000, 10, (0, 493, 10, 13)), (10, 1000, (493, 0, 13, 10))],
)
def test_random_resized_crop_fallback_for_extreme_aspect(
    width: int, height: int, expected: tuple[int, int, int, int]
) -> None:
    for seed in range(20):
        assert random_resized_crop(height, width, np.random.default_rng(seed)) == expected
    out = imagenet_train(column_ramp(width, height), np.random.default_rng(0), size=16)
    assert out.shape == (16, 16, 3)


# ---------------------------------------------------------------------------- imagenet_train


def crop_then_resize(image: np.ndarray, seed: int, size: int = 224) -> tuple[np.ndarray, tuple]:
    """Reference: the same draws, then PIL crop followed by resize, then flip."""
    rng = np.random.default_rng(seed)
    top, left, h, w = random_resized_crop(image.shape[0], image.shape[1], rng)
    flip = rng.random() < 0.5
    crop = Image.fromarray(image).crop((left, top, left + w, top + h))
    out = np.asarray(crop.resize((size, size), Image.BILINEAR))
    return (out[:, ::-1] if flip else out), (h, w)


def test_imagenet_train_equals_crop_then_resize(imagenet_photo: np.ndarray, tmp_path: Path) -> None:
    png = tmp_path / "chelsea.png"
    Image.fromarray(imagenet_photo).save(png)
    for seed in range(40):
        ref, (h, w) = crop_then_resize(imagenet_photo, seed)
        out = imagenet_train(imagenet_photo, np.random.default_rng(seed))
        with Image.open(png) as img:
            np.testing.assert_array_equal(imagenet_train(img, np.random.default_rng(seed)), out)
        diff = np.abs(out.astype(int) - ref)
        # Away from the crop's border, where resize(box=...) may blend in outside pixels, the
        # two agree up to Pillow's fixed-point coefficient rounding (a shifted crop of a real
        # photo would differ by far more than 1).
        my, mx = math.ceil(max(1, 224 / h)) + 1, math.ceil(max(1, 224 / w)) + 1
        inner = diff[my:-my, mx:-mx]
        assert inner.max() <= 1, seed
        assert diff.mean() < 0.3, seed


def test_imagenet_train_output_and_determinism(imagenet_photo: np.ndarray) -> None:
    out = imagenet_train(imagenet_photo, np.random.default_rng(3))
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert out.flags.c_contiguous and out.flags.writeable
    assert out.tobytes() == imagenet_train(imagenet_photo, np.random.default_rng(3)).tobytes()
    other = imagenet_train(imagenet_photo, np.random.default_rng(4))
    assert out.tobytes() != other.tobytes()
    assert imagenet_train(imagenet_photo, np.random.default_rng(3), size=64).shape == (64, 64, 3)


def test_imagenet_train_flips_half_the_time() -> None:
    image = column_ramp(200, 150)
    flips = sum(
        is_flipped(imagenet_train(image, np.random.default_rng(s), size=32)[16]) for s in range(200)
    )
    assert 70 <= flips <= 130


def test_imagenet_train_jpeg_is_deterministic_across_fresh_opens(big_jpeg: bytes) -> None:
    for seed in range(3):
        a = imagenet_train(Image.open(io.BytesIO(big_jpeg)), np.random.default_rng(seed))
        b = imagenet_train(Image.open(io.BytesIO(big_jpeg)), np.random.default_rng(seed))
        assert a.tobytes() == b.tobytes()
    c = imagenet_train(Image.open(io.BytesIO(big_jpeg)), np.random.default_rng(99))
    assert c.tobytes() != a.tobytes()


def expected_draft_scale(seed: int, size: int = 224) -> int:
    _, _, h, w = random_resized_crop(1536, 2048, np.random.default_rng(seed))
    return next((s for s in (8, 4, 2) if min(w, h) >= size * s), 1)


def test_draft_decodes_large_jpeg_at_reduced_scale(big_jpeg: bytes) -> None:
    full = np.asarray(Image.open(io.BytesIO(big_jpeg)).convert("RGB"))
    scales = set()
    for seed in range(12):
        scale = expected_draft_scale(seed)
        scales.add(scale)
        img = Image.open(io.BytesIO(big_jpeg))
        out = imagenet_train(img, np.random.default_rng(seed))
        assert img.size == (math.ceil(2048 / scale), math.ceil(1536 / scale)), seed
        assert out.shape == (224, 224, 3)
        no_draft = imagenet_train(full, np.random.default_rng(seed))
        assert np.abs(out.astype(int) - no_draft).mean() < 2.0, seed
        # Reusing the consumed image keeps the geometry of the full-size image.
        again = imagenet_train(img, np.random.default_rng(seed))
        assert np.abs(again.astype(int) - out).max() == 0
    assert {2, 4} <= scales  # decodes at 1/2 and 1/4 scale both happened


def test_draft_keeps_full_scale_for_small_crops(big_jpeg: bytes) -> None:
    seed = next(s for s in range(1000) if expected_draft_scale(s, size=512) == 1)
    img = Image.open(io.BytesIO(big_jpeg))
    imagenet_train(img, np.random.default_rng(seed), size=512)
    assert img.size == (2048, 1536) and DRAFT_INFO not in img.info


# ---------------------------------------------------------------------------- imagenet_eval


@pytest.mark.parametrize(("width", "height"), [(500, 375), (375, 500), (300, 300), (257, 1000)])
def test_imagenet_eval_equals_resize_then_centre_crop(width: int, height: int) -> None:
    image = photo("coffee", width, height)
    new_w, new_h = eval_resize(width, height)
    assert min(new_w, new_h) == 256
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    top, left = round((new_h - 224) / 2.0), round((new_w - 224) / 2.0)
    ref = resized[top : top + 224, left : left + 224]
    out = imagenet_eval(image)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    diff = np.abs(out.astype(int) - ref)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_imagenet_eval_with_draft(big_jpeg: bytes) -> None:
    img = Image.open(io.BytesIO(big_jpeg))
    out = imagenet_eval(img)
    assert img.size == (512, 384)  # the 256 x 341 resize only needs a 1/4-scale decode
    full = imagenet_eval(np.asarray(Image.open(io.BytesIO(big_jpeg)).convert("RGB")))
    assert np.abs(out.astype(int) - full).mean() < 2.0
    with pytest.raises(ValueError, match="at least"):
        imagenet_eval(img, size=300, resize=256)


@pytest.mark.parametrize(("size", "resize"), [(64, 73), (160, 183), (299, 342), (384, 439)])
def test_other_sizes_train_and_evaluate_at_that_size(size: int, resize: int) -> None:
    """Other image sizes: the eval resize keeps the 224/256 crop ratio, training crops to the
    size; CIFAR's padded crop works at any size too (64 for Tiny-ImageNet-like data)."""
    image = photo("coffee", 500, 400)
    assert eval_resize_for(size) == resize
    new_w, new_h = eval_resize(500, 400, resize)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)
    diff = np.abs(imagenet_eval(image, size).astype(int) - resized[top:top + size,
                                                                    left:left + size])
    assert diff.max() <= 1
    rng = np.random.default_rng(0)
    assert imagenet_train(image, rng, size).shape == (size, size, 3)
    small = photo("coffee", size, size)
    crop = cifar_train(small, np.random.default_rng(1), size)
    assert crop.shape == (size, size, 3)
    np.testing.assert_array_equal(cifar_eval(small, size), small)


# ---------------------------------------------------------------------------- sources and modes


def test_array_sources_become_rgb() -> None:
    grey = photo("camera", 64, 48)  # a real grey photo: H x W
    rgb = np.repeat(grey[..., None], 3, axis=2)
    expected = imagenet_train(rgb, np.random.default_rng(1), size=32)
    for source in (grey, grey[..., None], np.dstack([rgb, np.full_like(grey, 7)])):
        np.testing.assert_array_equal(
            imagenet_train(source, np.random.default_rng(1), 32), expected
        )
    for bad in (grey.astype(np.float32), np.zeros((8, 8, 2), np.uint8), np.zeros((2, 8, 8, 3))):
        with pytest.raises(ValueError, match="image array"):
            imagenet_train(bad, np.random.default_rng(1))


def rgb_patch() -> np.ndarray:
    return photo("astronaut", 16, 12)


def check_rgb(array: np.ndarray, shape: tuple[int, int] = (12, 16)) -> None:
    assert array.shape == (*shape, 3) and array.dtype == np.uint8
    assert array.flags.c_contiguous and array.flags.writeable


@pytest.mark.parametrize("mode", ["1", "L", "P", "LA", "PA", "RGBA", "CMYK", "YCbCr", "RGB"])
def test_to_rgb_array_matches_pillow_convert(mode: str) -> None:
    img = Image.fromarray(rgb_patch()).convert(mode)
    out = to_rgb_array(img)
    check_rgb(out)
    np.testing.assert_array_equal(out, np.asarray(img.convert("RGB")))


def test_to_rgb_array_drops_alpha_without_compositing() -> None:
    rgba = np.dstack([rgb_patch(), np.zeros((12, 16), np.uint8)])  # fully transparent
    np.testing.assert_array_equal(to_rgb_array(Image.fromarray(rgba)), rgb_patch())


def test_to_rgb_array_palette_with_transparency() -> None:
    img = Image.fromarray(rgb_patch()).convert("P")
    img.info["transparency"] = bytes([0] * 8 + [255] * 248)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = to_rgb_array(img)
    np.testing.assert_array_equal(out, np.asarray(img.convert("RGBA"))[..., :3])
    single = Image.fromarray(rgb_patch()).convert("P")
    single.info["transparency"] = 3
    np.testing.assert_array_equal(to_rgb_array(single), np.asarray(single.convert("RGBA"))[..., :3])


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I"])
def test_to_rgb_array_16_bit_keeps_high_byte(mode: str) -> None:
    values = np.array([[0, 255, 256, 0x1234], [0x8000, 0xABCD, 0xFF00, 0xFFFF]], np.uint16)
    img = Image.fromarray(values).convert(mode) if mode == "I" else Image.new(mode, (4, 2))
    if mode != "I":
        img.putdata(values.ravel().tolist())
    out = to_rgb_array(img)
    check_rgb(out, (2, 4))
    expected = (values >> 8).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], expected)


def test_to_rgb_array_32_bit_int_is_clipped_then_scaled() -> None:
    img = Image.fromarray(np.array([[-5, 70000, 0x4000]], np.int32))
    assert img.mode == "I"
    np.testing.assert_array_equal(to_rgb_array(img)[0, :, 0], [0, 255, 0x40])


def test_to_rgb_array_float_is_clipped() -> None:
    img = Image.fromarray(np.array([[-5.0, 12.7, 300.0, np.nan]], np.float32))
    assert img.mode == "F"
    out = to_rgb_array(img)
    check_rgb(out, (1, 4))
    np.testing.assert_array_equal(out[0, :, 1], [0, 12, 255, 0])


def test_16_bit_png_source_for_imagenet_train(tmp_path: Path) -> None:
    deep = (photo("camera", 64, 48).astype(np.uint16) << 8) | 0xFF
    path = tmp_path / "deep.png"
    Image.fromarray(deep).save(path)
    with Image.open(path) as img:
        assert img.mode == "I;16"
        out = imagenet_train(img, np.random.default_rng(5), size=32)
    grey = (deep >> 8).astype(np.uint8)
    np.testing.assert_array_equal(out, imagenet_train(grey, np.random.default_rng(5), size=32))


# ---------------------------------------------------------------------------- dispatch


def test_preprocess_dispatch(cifar_photo: np.ndarray) -> None:
    assert set(PREPROCESSINGS) == {"cifar", "imagenet"}
    out = preprocess("cifar", cifar_photo, np.random.default_rng(2))
    np.testing.assert_array_equal(out, cifar_train(cifar_photo, np.random.default_rng(2)))
    assert preprocess("imagenet", cifar_photo, np.random.default_rng(2)).shape == (224, 224, 3)
    with pytest.raises(ValueError, match=r"'svhn'.*cifar, imagenet"):
        preprocess("svhn", cifar_photo, np.random.default_rng(2))


# ---------------------------------------------------------------------------- cifar_eval


def test_cifar_eval_is_the_centre_of_the_padded_crop() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert np.array_equal(cifar_eval(image), image)  # CIFAR's own test images: unchanged
    big = rng.integers(0, 256, (40, 37, 3), dtype=np.uint8)
    assert np.array_equal(cifar_eval(big), big[4:36, 2:34])
    small = rng.integers(1, 256, (28, 30, 3), dtype=np.uint8)
    out = cifar_eval(small)
    assert np.array_equal(out[2:30, 1:31], small)
    assert not out[:2].any() and not out[30:].any() and not out[:, :1].any()
    assert PREPROCESSINGS["cifar"].eval is cifar_eval
    assert PREPROCESSINGS["imagenet"].eval is imagenet_eval
