"""augserver.augmix: the mixing, its randomness, determinism and configuration."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from PIL import Image

from augserver import op_names, ops
from augserver.augmix import (
    AugMixConfig,
    augment_and_mix,
    augmix_triple,
    augmix_views,
    draw_program,
    sample_rng,
)
from augserver.errors import ConfigError
from augserver.reference import PIL_OPS

pytestmark = pytest.mark.unit


def replay_with_pillow(image: np.ndarray, program, views: int) -> np.ndarray:
    """The float64 AugMix result of ``program`` computed with the reference Pillow ops."""
    codes, params, lengths, weights, skips = program
    size = (image.shape[1], image.shape[0])
    width = weights.shape[1]
    mixed = []
    k = 0
    for v in range(views):
        mix = np.zeros(image.shape, np.float64)
        for i in range(width):
            chain = Image.fromarray(image)
            for _ in range(lengths[v * width + i]):
                name = op_names.ALL_OPS[codes[k]]
                value = _value_from_params(name, params[k], size)
                chain = PIL_OPS[name](chain, value)
                k += 1
            mix += weights[v, i] * np.asarray(chain, np.float64)
        mixed.append((1 - skips[v]) * image + skips[v] * mix)
    return np.stack(mixed)


def _value_from_params(name: str, row: np.ndarray, size: tuple[int, int]):
    """Recover the concrete op value from a program row (inverse of ops.op_params)."""
    if name in ("autocontrast", "equalize"):
        return None
    if name == "rotate":
        for degrees in range(-30, 31):
            if ops.op_params("rotate", degrees, size) == tuple(row):
                return degrees
        raise AssertionError(f"no integer angle gives {row}")
    index = {"shear_x": 1, "shear_y": 3, "translate_x": 2, "translate_y": 5}.get(name, 0)
    value = float(row[index])
    return int(value) if name in ("posterize", "solarize", "translate_x", "translate_y") else value


@pytest.mark.parametrize("size", ["astronaut32", "coffee224", "chelsea61x40"])
@pytest.mark.parametrize("config", [AugMixConfig(), AugMixConfig(severity=1, all_ops=True)])
def test_views_are_the_rounded_float_mix_of_pillow_chains(photos, size, config):
    image = photos[size]
    h, w, _ = image.shape
    for index in range(3):
        program = draw_program(sample_rng(0, 0, index), config, 2, (w, h))
        expected = replay_with_pillow(image, program, 2)
        out = augmix_views(image, sample_rng(0, 0, index), config, 2)
        error = np.abs(out.astype(np.float64) - expected)
        assert error.max() <= 0.5 + 1e-9, "output is not the float mix rounded to nearest"
        assert np.array_equal(out, np.floor(expected + 0.5)), "not rounded to nearest"


def test_rounding_not_truncation():
    # A gradient image and random weights give fractional mixes; truncation would be
    # below the float result by up to 1, rounding is within 0.5 and hits floor(x + 0.5).
    image = (np.arange(16 * 16 * 3).reshape(16, 16, 3) % 256).astype(np.uint8)
    config = AugMixConfig(width=2, depth=1)
    fractions_above_half = 0
    for seed in range(5):
        program = draw_program(np.random.default_rng(seed), config, 1, (16, 16))
        out = augmix_views(image, np.random.default_rng(seed), config, 1)[0]
        expected = replay_with_pillow(image, program, 1)[0]
        fractions_above_half += np.count_nonzero(expected % 1 > 0.5)
        assert np.array_equal(out, np.floor(expected + 0.5).astype(np.uint8))
    assert fractions_above_half > 0, "the test needs fractions that truncation gets wrong"


def test_same_rng_same_bytes_and_different_indices_differ(photos):
    image = photos["coffee224"]
    config = AugMixConfig(severity=3)
    a = augmix_triple(image, sample_rng(3, 1, 42), config)
    b = augmix_triple(image, sample_rng(3, 1, 42), config)
    c = augmix_triple(image, sample_rng(3, 1, 43), config)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[1], c[1])
    assert not np.array_equal(a[1], a[2]), "the two views must be independent draws"
    assert a[0] is image


def test_sample_rng_depends_on_all_three_inputs():
    draws = {
        key: sample_rng(*key).integers(0, 2**62)
        for key in [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 0, 0)]
    }
    assert len(set(draws.values())) == 4
    with pytest.raises(ValueError, match="index"):
        sample_rng(0, 0, -1)
    with pytest.raises(ValueError, match="seed"):
        sample_rng(1.5, 0, 0)


def test_augment_and_mix_shape_and_generator_only(photos):
    image = photos["chelsea61x40"]
    np.random.seed(0)
    state = np.random.get_state()[1].copy()
    out = augment_and_mix(image, np.random.default_rng(1))
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.array_equal(np.random.get_state()[1], state), "global numpy RNG was used"
    assert np.array_equal(out, augment_and_mix(image, np.random.default_rng(1)))


def test_program_distribution():
    config = AugMixConfig()
    depths = collections.Counter()
    op_counts = collections.Counter()
    for seed in range(400):
        program = draw_program(np.random.default_rng(seed), config, 2, (32, 32))
        depths.update(program.lengths.tolist())
        op_counts.update(program.codes.tolist())
        assert np.allclose(program.weights.sum(axis=1), 1.0)
        assert np.all(program.weights >= 0) and np.all((program.skips >= 0) & (program.skips <= 1))
        assert len(program.codes) == program.lengths.sum() == len(program.params)
    assert set(depths) == {1, 2, 3}
    total = sum(depths.values())
    assert all(abs(count / total - 1 / 3) < 0.05 for count in depths.values())
    assert set(op_counts) == set(range(9)), "default set must be the nine ops"
    total = sum(op_counts.values())
    assert all(abs(count / total - 1 / 9) < 0.02 for count in op_counts.values())

    fixed = draw_program(np.random.default_rng(0), AugMixConfig(depth=2, width=4), 1, (8, 8))
    assert fixed.lengths.tolist() == [2, 2, 2, 2] and fixed.weights.shape == (1, 4)
    extra = draw_program(np.random.default_rng(0), AugMixConfig(all_ops=True), 50, (8, 8))
    assert set(extra.codes.tolist()) == set(range(13))


def test_out_buffer_is_filled_in_place(photos):
    image = photos["astronaut32"]
    expected = augmix_views(image, sample_rng(0, 0, 5), AugMixConfig(), 2)
    batch = np.zeros((4, 2, 32, 32, 3), np.uint8)
    augmix_views(image, sample_rng(0, 0, 5), AugMixConfig(), 2, out=batch[1])
    assert np.array_equal(batch[1], expected)
    assert not batch[0].any()
    # A sample's slot in a (views, batch, H, W, 3) buffer: its views lie a batch apart.
    views = np.zeros((3, 4, 32, 32, 3), np.uint8)
    augmix_views(image, sample_rng(0, 0, 5), AugMixConfig(), 2, out=views[1:, 2])
    assert np.array_equal(views[1:, 2], expected)
    assert not views[0].any() and not views[:, [0, 1, 3]].any()
    with pytest.raises(ValueError, match=r"out must be .*\(2, 32, 32, 3\), got uint8 \(4, 32"):
        augmix_views(image, sample_rng(0, 0, 5), AugMixConfig(), 2, out=batch[:, 0])
    every_other_column = np.zeros((2, 32, 64, 3), np.uint8)[:, :, ::2]
    with pytest.raises(ValueError, match="each view must be one C-contiguous block"):
        augmix_views(image, sample_rng(0, 0, 5), AugMixConfig(), 2, out=every_other_column)
    read_only = np.zeros((2, 32, 32, 3), np.uint8)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        augmix_views(image, sample_rng(0, 0, 5), AugMixConfig(), 2, out=read_only)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"severity": 0}, "severity"),
        ({"severity": 11}, "severity"),
        ({"width": 0}, "width"),
        ({"depth": 0}, "depth"),
        ({"depth": -2}, "depth"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message) as caught:
        AugMixConfig(**kwargs)
    assert caught.value.key == f"augmix.{message}"  # the job file's key, for ConfigError


def test_config_type_errors():
    with pytest.raises(ConfigError, match="all_ops") as caught:
        AugMixConfig(all_ops="yes")
    assert caught.value.key == "augmix.all_ops"
    with pytest.raises(ConfigError, match="severity"):
        AugMixConfig(severity="3")
