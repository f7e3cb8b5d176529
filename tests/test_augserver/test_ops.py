"""augserver.ops: bit-exact with the reference Pillow calls over the reachable parameters."""

from __future__ import annotations

import numpy as np
import pytest

from augserver import op_names, ops
from augserver.reference import apply_pil

pytestmark = pytest.mark.unit

SIZES = ("astronaut32", "coffee224", "chelsea61x40")


def reachable_values(name: str, width: int, height: int) -> list:
    """Every value the sampler can produce for ``name`` at severities 1..10 (a dense grid for
    the continuous ones), plus the values just outside that range that ``apply`` accepts."""
    if name in ("autocontrast", "equalize"):
        return [None]
    if name == "posterize":
        return list(range(1, 9))
    if name == "solarize":
        return list(range(0, 257))
    if name == "rotate":
        return list(range(-30, 31))
    if name == "translate_x":
        return list(range(-(width // 3) - 1, width // 3 + 2))
    if name == "translate_y":
        return list(range(-(height // 3) - 1, height // 3 + 2))
    if name in ("shear_x", "shear_y"):
        grid = np.linspace(0.003, 0.3, 34)
        return [float(v) for v in np.concatenate([grid, -grid, [0.0]])]
    return [float(v) for v in np.linspace(0.0, 1.9, 39)]  # enhance factors


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", op_names.ALL_OPS)
def test_apply_matches_pillow_over_reachable_range(photos, name, size):
    image = photos[size]
    height, width, _ = image.shape
    mismatched = [
        value
        for value in reachable_values(name, width, height)
        if not np.array_equal(ops.apply(name, image, value), apply_pil(name, image, value))
    ]
    assert mismatched == [], f"{name} differs from Pillow at {size} for {mismatched[:5]}"


@pytest.mark.parametrize("name", op_names.ALL_OPS)
def test_apply_matches_pillow_for_sampled_values(photos, name):
    rng = np.random.default_rng(1234)
    for size in SIZES:
        image = photos[size]
        for severity in (1, 3, 10):
            for _ in range(8):
                value = ops.sample(name, rng, severity, (image.shape[1], image.shape[0]))
                assert np.array_equal(
                    ops.apply(name, image, value), apply_pil(name, image, value)
                ), (name, size, value)


@pytest.mark.parametrize("degrees", [0, 90, 180, 270, 360, -90, 45.5, 12.25])
def test_rotate_special_angles(photos, degrees):
    for size in SIZES:
        image = photos[size]
        assert np.array_equal(
            ops.apply("rotate", image, degrees), apply_pil("rotate", image, degrees)
        ), (degrees, size)


def test_fractional_translate_and_large_shear_match_pillow(photos):
    image = photos["chelsea61x40"]
    for name, value in [("translate_x", 2.5), ("translate_y", -3.25), ("shear_x", 1.7)]:
        assert np.array_equal(ops.apply(name, image, value), apply_pil(name, image, value))


def test_flat_and_extreme_images(photos):
    flat = np.full((20, 30, 3), 77, np.uint8)
    two_tone = np.zeros((20, 30, 3), np.uint8)
    two_tone[:, 15:] = 255
    for image in (flat, two_tone):
        for name in op_names.ALL_OPS:
            value = ops.sample(name, np.random.default_rng(5), 5, (30, 20))
            assert np.array_equal(ops.apply(name, image, value), apply_pil(name, image, value))


def test_apply_does_not_modify_input_and_accepts_views(photos):
    image = photos["coffee224"]
    before = image.copy()
    view = image[10:50, 20:90]  # not contiguous
    out = ops.apply("rotate", view, 13)
    assert np.array_equal(out, apply_pil("rotate", np.ascontiguousarray(view), 13))
    assert np.array_equal(image, before)
    assert out.shape == view.shape and out.dtype == np.uint8


def test_sample_formulas():
    size = (224, 224)
    rng = np.random.default_rng(0)
    for _ in range(300):
        assert ops.sample("posterize", rng, 10, size) in (1, 2, 3, 4)
        assert 1 <= ops.sample("solarize", rng, 10, size) <= 254
        assert -29 <= ops.sample("rotate", rng, 10, size) <= 29
        assert 0.003 <= abs(ops.sample("shear_x", rng, 10, size)) < 0.3
        assert abs(ops.sample("translate_x", rng, 10, size)) <= 224 // 3
        assert 0.118 <= ops.sample("color", rng, 10, size) < 1.9
    assert ops.sample("equalize", rng, 3, size) is None
    # severity 1: level in [0.1, 1) -> rotate int(level * 3) is 0 at most levels, |deg| <= 2
    assert {abs(ops.sample("rotate", rng, 1, size)) for _ in range(200)} <= {0, 1, 2}


def test_op_value_is_the_reference_formula():
    assert ops.op_value("rotate", 5.0, True, (32, 32)) == -15
    assert ops.op_value("posterize", 2.6, False, (32, 32)) == 4 - int(2.6 * 4 / 10)
    assert ops.op_value("solarize", 3.3, False, (32, 32)) == 256 - int(3.3 * 256 / 10)
    assert ops.op_value("translate_x", 9.9, False, (60, 30)) == int(9.9 * (60 / 3) / 10)
    assert ops.op_value("translate_y", 9.9, True, (60, 30)) == -int(9.9 * (30 / 3) / 10)
    assert ops.op_value("shear_y", 2.0, True, (32, 32)) == -(2.0 * 0.3 / 10)
    assert ops.op_value("sharpness", 2.0, True, (32, 32)) == 2.0 * 1.8 / 10 + 0.1


def test_sample_uses_only_the_given_generator():
    np.random.seed(99)
    state = np.random.get_state()[1].copy()
    a = [ops.sample("rotate", np.random.default_rng(7), 3, (32, 32)) for _ in range(5)]
    b = [ops.sample("rotate", np.random.default_rng(7), 3, (32, 32)) for _ in range(5)]
    assert a == b
    assert np.array_equal(np.random.get_state()[1], state)
    signs = {
        np.sign(ops.sample("shear_x", np.random.default_rng(seed), 3, (32, 32)))
        for seed in range(50)
    }
    assert signs == {-1.0, 1.0}


@pytest.mark.parametrize(
    ("name", "image", "value", "error"),
    [
        ("blur", np.zeros((4, 4, 3), np.uint8), 1, ValueError),
        ("rotate", np.zeros((4, 4), np.uint8), 1, ValueError),
        ("rotate", np.zeros((4, 4, 3), np.float32), 1, ValueError),
        ("rotate", [[0, 0, 0]], 1, TypeError),
        ("rotate", np.zeros((4, 4, 3), np.uint8), "ten", TypeError),
        ("rotate", np.zeros((4, 4, 3), np.uint8), float("nan"), ValueError),
        ("posterize", np.zeros((4, 4, 3), np.uint8), 0, ValueError),
        ("posterize", np.zeros((4, 4, 3), np.uint8), 2.5, ValueError),
        ("equalize", np.zeros((4, 4, 3), np.uint8), 3, ValueError),
        ("color", np.zeros((4, 4, 3), np.uint8), -1.0, ValueError),
    ],
)
def test_apply_rejects_bad_input(name, image, value, error):
    with pytest.raises(error):
        ops.apply(name, image, value)


def test_unknown_op_error_names_the_op():
    with pytest.raises(ValueError, match="'blur'"):
        ops.sample("blur", np.random.default_rng(0), 3, (32, 32))
