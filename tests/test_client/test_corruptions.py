"""client.robustness: the 15 CIFAR-10-C / ImageNet-C corruptions, seeding, the cache and CLI."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import skimage.color
import skimage.data
import skimage.filters
from PIL import Image

from client.programs import corrupt as corrupt_program
from client.robustness import cache as K
from client.robustness import corruptions as C
from client.robustness.cache import (
    cache_path,
    fingerprint,
    iter_corrupted,
    load_set,
    save_set,
)
from client.robustness.corruptions import corrupt, corrupt_images, image_rng
from client.robustness.tables import CORRUPTIONS, SEVERITIES, TABLES
from tests.service_helpers import REPO

pytestmark = pytest.mark.unit

# Corruptions that draw nothing from the generator.
DETERMINISTIC = {"defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate",
                 "jpeg_compression"}  # fmt: skip
RANDOM = [n for n in CORRUPTIONS if n not in DETERMINISTIC]


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    """Twelve 32x32 views of three real photos (whole photo and three 128-px crops each)."""
    out = []
    for photo in (skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()):
        out.append(np.asarray(Image.fromarray(photo).resize((32, 32), Image.BILINEAR)))
        h, w = photo.shape[:2]
        for r, c in ((h // 4, w // 4), (h // 2, w // 3), (h // 3, w // 2)):
            patch = Image.fromarray(photo[r : r + 128, c : c + 128])
            out.append(np.asarray(patch.resize((32, 32), Image.BILINEAR)))
    return np.stack(out)


@pytest.fixture(scope="module")
def all_sets(crops: np.ndarray) -> dict[tuple[str, int], np.ndarray]:
    return {(n, s): corrupt_images(crops, n, s) for n in CORRUPTIONS for s in SEVERITIES}


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).mean())


# ----------------------------------------------------------------------- every corruption


def test_names_and_order() -> None:
    assert CORRUPTIONS == (
        "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
        "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
        "elastic_transform", "pixelate", "jpeg_compression",
    )  # fmt: skip
    assert SEVERITIES == (1, 2, 3, 4, 5)


def test_every_corruption_keeps_shape_and_dtype_and_changes_every_image(crops, all_sets) -> None:
    for (name, severity), out in all_sets.items():
        assert out.shape == crops.shape and out.dtype == np.uint8, (name, severity)
        assert out.flags.c_contiguous
        for i in range(len(crops)):
            # On these natural photos no formula can leave an image unchanged (contrast and
            # brightness only could on a flat or an all-white image).
            assert not np.array_equal(out[i], crops[i]), (name, severity, i)


def test_difference_grows_with_severity(crops, all_sets) -> None:
    diff = {
        name: [mean_abs_diff(all_sets[name, s], crops) for s in SEVERITIES] for name in CORRUPTIONS
    }
    # The tables are not monotone in pixel distance for three corruptions, by construction:
    # glass_blur's CIFAR sigma goes 0.05, 0.25, 0.4, 0.25, 0.4 (a wider blur smooths the
    # shuffled pixels back towards the image, so 5 can land below 4); frost lowers the image
    # weight as it raises the frost weight, which cancel in a mean difference;
    # elastic_transform's affine part shrinks with severity while the elastic part grows.
    # Check what the tables do make monotone for those.
    exempt = {"glass_blur", "frost", "elastic_transform"}
    for name in CORRUPTIONS:
        d = diff[name]
        assert d[0] > 0, name
        if name in exempt:
            continue
        for lo, hi in itertools.pairwise(d):
            # Non-strict, within 5 % for the random angles of motion_blur (severities 3 and 4
            # share sigma 2, so their kernels are nearly the same).
            assert hi >= lo * 0.95, (name, d)
        assert d[-1] > d[0], (name, d)
    g = diff["glass_blur"]
    assert g[3] > g[1] and g[4] > g[2], g  # same sigma, twice the swapping
    f = diff["frost"]
    assert f[1] > f[0], f  # same image weight (1), frost weight 0.2 -> 0.3


def test_imagenet_table_at_224(photos) -> None:
    img = photos["coffee224"]
    for name in ("gaussian_noise", "defocus_blur", "contrast", "glass_blur"):
        outs = []
        for severity in (1, 3, 5):
            out = corrupt(img, name, severity, np.random.default_rng(severity), params="imagenet")
            assert out.shape == img.shape and out.dtype == np.uint8
            outs.append(mean_abs_diff(out, img))
        assert outs[0] < outs[1] < outs[2], (name, outs)
    # The default table follows the image size; the two tables really differ.
    rng = lambda: np.random.default_rng(7)  # noqa: E731
    assert np.array_equal(
        corrupt(img, "contrast", 2, rng()), corrupt(img, "contrast", 2, rng(), params="imagenet")
    )
    assert not np.array_equal(
        corrupt(img, "contrast", 2, rng(), params="cifar"), corrupt(img, "contrast", 2, rng())
    )
    assert C.default_params(32, 32) == "cifar" and C.default_params(224, 224) == "imagenet"


@pytest.mark.parametrize("shape", [(40, 61), (C.MIN_SIDE, C.MIN_SIDE + 3), (70, 33)])
def test_any_size_works(photos, shape: tuple[int, int]) -> None:
    h, w = shape
    img = np.asarray(Image.fromarray(photos["chelsea61x40"]).resize((w, h), Image.BILINEAR))
    for name in CORRUPTIONS:
        for severity in (1, 5):
            out = corrupt(img, name, severity, np.random.default_rng(0))
            assert out.shape == img.shape and out.dtype == np.uint8, (name, severity, shape)


def test_glass_blur_32_is_fast(crops) -> None:
    rng = np.random.default_rng(0)
    corrupt(crops[0], "glass_blur", 5, rng)  # warm caches
    times = []
    for _ in range(5):
        start = time.perf_counter()
        corrupt(crops[0], "glass_blur", 5, rng)
        times.append(time.perf_counter() - start)
    assert min(times) < 0.010, times


# ---------------------------------------------------------------- faithfulness of formulas


def test_brightness_matches_skimage_hsv_round_trip(crops) -> None:
    for severity in SEVERITIES:
        c = TABLES["cifar"]["brightness"][severity - 1]
        hsv = skimage.color.rgb2hsv(crops / 255.0)
        hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
        expected = (np.clip(skimage.color.hsv2rgb(hsv), 0, 1) * 255).astype(np.uint8)
        got = corrupt_images(crops, "brightness", severity)
        assert np.abs(got.astype(int) - expected).max() <= 1


def test_impulse_noise_is_salt_and_pepper(crops) -> None:
    img = np.full((64, 64, 3), 128, np.uint8)
    out = corrupt(img, "impulse_noise", 5, np.random.default_rng(1), params="imagenet")
    amount = TABLES["imagenet"]["impulse_noise"][4]
    changed = out != 128
    assert set(np.unique(out[changed])) <= {0, 255}
    assert abs(changed.mean() - amount) < 0.02
    assert abs((out == 255).mean() - (out == 0).mean()) < 0.02  # salt vs pepper 0.5


@pytest.mark.parametrize(("params", "severity"), [("cifar", 5), ("imagenet", 4)])
def test_glass_blur_runs_the_originals_pixel_loop(crops, params: str, severity: int) -> None:
    sigma, delta, iterations = TABLES[params]["glass_blur"][severity - 1]
    img = crops[1]

    def gaussian(x):
        return skimage.filters.gaussian(x, sigma=sigma, channel_axis=-1)

    # The original loop, verbatim in effect (a tuple assignment of numpy views, which copies
    # rather than swaps), fed the draws corrupt() makes (one block per iteration).
    rng = np.random.default_rng(5)
    x = np.uint8(gaussian(img / 255.0) * 255)
    h, w = x.shape[:2]
    rows, cols = range(h - delta, delta, -1), range(w - delta, delta, -1)
    for _ in range(iterations):
        d = rng.integers(-delta, delta, size=(len(rows) * len(cols), 2))
        k = 0
        for r in rows:
            for c in cols:
                dx, dy = d[k]
                k += 1
                x[r, c], x[r + dy, c + dx] = x[r + dy, c + dx], x[r, c]
    expected = np.uint8(np.clip(gaussian(x / 255.0), 0, 1) * 255)
    got = corrupt(img, "glass_blur", severity, np.random.default_rng(5), params=params)
    assert np.abs(got.astype(int) - expected).max() <= 1


def test_motion_blur_kernel_is_a_one_sided_line() -> None:
    x = np.zeros((9, 21))
    x[4, 15] = 1.0
    out = C._motion_blur(x, radius=3, sigma=2, angle=0)
    assert np.allclose(out.sum(), 1.0)
    nz = np.argwhere(out > 0)
    assert set(nz[:, 0]) == {4}  # stays on the row
    assert sorted(nz[:, 1]) == list(range(9, 16))  # 2 * 3 + 1 taps, trailing one way
    assert np.all(np.diff(out[4, 9:16]) > 0)  # Gaussian weights fall with distance
    vertical = C._motion_blur(x, radius=3, sigma=2, angle=90)
    assert set(np.argwhere(vertical > 0)[:, 1]) == {15}


def test_frost_sheets_are_fixed_and_independent_of_the_generator() -> None:
    a = C._frost_base(2)
    assert a.shape == (C._FROST_SIDE, C._FROST_SIDE, 3) and a.dtype == np.uint8
    C._frost_base.cache_clear()
    assert np.array_equal(a, C._frost_base(2))
    assert not np.array_equal(a, C._frost_base(3))
    b, g = a[..., 2].mean(), a[..., 1].mean()
    assert b > g > a[..., 0].mean() > 40  # pale blue, not black


# ---------------------------------------------------------------- determinism and batching


def test_same_seed_same_bytes_other_seed_differs(crops) -> None:
    x = crops[:4]
    for name in CORRUPTIONS:
        a = corrupt_images(x, name, 3, seed=11)
        assert np.array_equal(a, corrupt_images(x, name, 3, seed=11)), name
        b = corrupt_images(x, name, 3, seed=12)
        if name in DETERMINISTIC:
            assert np.array_equal(a, b), name
        else:
            assert not np.array_equal(a, b), name


def test_results_do_not_depend_on_batching(crops) -> None:
    for name in RANDOM:
        whole = corrupt_images(crops[:5], name, 4, seed=3)
        assert np.array_equal(whole[:2], corrupt_images(crops[:2], name, 4, seed=3)), name
        for i in range(5):
            one = corrupt(crops[i], name, 4, image_rng(3, name, 4, i))
            assert np.array_equal(whole[i], one), (name, i)


def test_image_rng_is_the_documented_seed_sequence() -> None:
    got = image_rng(4, "snow", 2, 9).random(3)
    ss = np.random.SeedSequence([4, CORRUPTIONS.index("snow"), 2, 9])
    assert np.array_equal(got, np.random.default_rng(ss).random(3))


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "gaussian"}, "unknown corruption 'gaussian'; valid names: gaussian_noise"),
        ({"severity": 0}, "severity must be in 1..5, got 0"),
        ({"severity": 6}, "severity must be in 1..5, got 6"),
        ({"severity": 2.0}, "severity must be an integer"),
        ({"severity": True}, "severity must be an integer"),
        ({"image": np.zeros((8, 8, 3), np.float32)}, "image must be uint8, got dtype float32"),
        ({"image": np.zeros((8, 8), np.uint8)}, "image must be H x W x 3 (HWC), got shape (8, 8)"),
        ({"image": np.zeros((8, 8, 4), np.uint8)}, "must have 3 (RGB) channels last"),
        ({"image": np.zeros((2, 8, 3), np.uint8)}, "at least 4x4 pixels, got 2x8"),
        ({"image": [[1, 2, 3]]}, "image must be a numpy array, got list"),
        ({"params": "tiny"}, "params must be 'cifar', 'imagenet' or None, got 'tiny'"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs: dict, message: str) -> None:
    args = {"image": np.zeros((8, 8, 3), np.uint8), "name": "fog", "severity": 1,
            "rng": np.random.default_rng(0), "params": None} | kwargs  # fmt: skip
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        corrupt(**args)


def test_bad_batches_and_generators() -> None:
    with pytest.raises(ValueError, match=r"N x H x W x 3 \(NHWC\), got shape \(8, 8, 3\)"):
        corrupt_images(np.zeros((8, 8, 3), np.uint8), "fog", 1)
    with pytest.raises(ValueError, match="images must be uint8, got dtype int64"):
        corrupt_images(np.zeros((1, 8, 8, 3), np.int64), "fog", 1)
    with pytest.raises(TypeError, match=r"numpy\.random\.Generator"):
        corrupt(np.zeros((8, 8, 3), np.uint8), "fog", 1, rng=np.random.RandomState(0))
    empty = corrupt_images(np.zeros((0, 8, 8, 3), np.uint8), "fog", 1)
    assert empty.shape == (0, 8, 8, 3)


# ----------------------------------------------------------------------------------- cache


def test_cache_miss_then_hit(crops, tmp_path: Path, monkeypatch) -> None:
    x = crops[:3]
    sel = {"names": ("contrast", "snow"), "severities": (1, 4)}
    first = list(iter_corrupted(x, tmp_path, seed=2, **sel))
    assert [(n, s) for n, s, _ in first] == [("contrast", 1), ("contrast", 4), ("snow", 1),
                                             ("snow", 4)]  # fmt: skip
    for name, severity, arr in first:
        assert np.array_equal(arr, corrupt_images(x, name, severity, seed=2))
        path = cache_path(x, tmp_path, name, severity, seed=2)
        assert path.parent.name == fingerprint(x, 2) and path.is_file()
        assert np.array_equal(load_set(path, x.shape), arr)
    assert not list(tmp_path.rglob("*.tmp"))

    def fail(*args, **kwargs):
        raise AssertionError("recomputed a cached set")

    monkeypatch.setattr(K, "corrupt_images", fail)
    second = list(iter_corrupted(x, tmp_path, seed=2, **sel))
    for (_, _, a), (_, _, b) in zip(first, second, strict=True):
        assert np.array_equal(a, b)


def test_corrupt_or_truncated_cache_files_are_made_again(crops, tmp_path, monkeypatch) -> None:
    x = crops[:2]
    sel = {"names": ("fog",), "severities": (1, 2, 3)}
    good = {s: a for _, s, a in iter_corrupted(x, tmp_path, **sel)}
    p1 = cache_path(x, tmp_path, "fog", 1)
    p2 = cache_path(x, tmp_path, "fog", 2)
    p1.write_bytes(p1.read_bytes()[:150])  # truncated mid-data
    p2.write_bytes(b"not a zip file at all")
    made = []
    real = K.corrupt_images
    monkeypatch.setattr(
        K, "corrupt_images", lambda imgs, n, s, *a, **k: made.append(s) or real(imgs, n, s, *a, **k)
    )
    again = {s: a for _, s, a in iter_corrupted(x, tmp_path, **sel)}
    assert sorted(made) == [1, 2]
    for s in (1, 2, 3):
        assert np.array_equal(again[s], good[s])
    assert np.array_equal(load_set(p1, x.shape), good[1])
    assert np.array_equal(load_set(p2, x.shape), good[2])
    # a readable file of the wrong shape is not trusted either
    save_set(p1, good[1][:1])
    made.clear()
    list(iter_corrupted(x, tmp_path, **sel))
    assert made == [1]


def test_interrupted_write_leaves_no_cache_file(crops, tmp_path, monkeypatch) -> None:
    def boom(self, name, data, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(zipfile.ZipFile, "writestr", boom)
    with pytest.raises(KeyboardInterrupt):
        list(iter_corrupted(crops[:1], tmp_path, names=["contrast"], severities=[1]))
    path = cache_path(crops[:1], tmp_path, "contrast", 1)
    assert not path.exists()
    assert not list(path.parent.glob("*.tmp")) and not list(path.parent.glob(".*"))


def test_fingerprint_covers_images_seed_params_and_version(crops, monkeypatch) -> None:
    x = crops[:2]
    base = fingerprint(x)
    assert fingerprint(x.copy()) == base
    assert fingerprint(x, seed=1) != base
    assert fingerprint(x, params="imagenet") != base
    assert fingerprint(x, params="cifar") == base  # the default for 32x32
    y = x.copy()
    y[1, 5, 5, 0] ^= 1
    assert fingerprint(y) != base
    assert fingerprint(x.reshape(2, 16, 64, 3)) != base  # same bytes, other shape
    monkeypatch.setattr(K, "VERSION", K.VERSION + 1)
    assert fingerprint(x) != base


def test_iter_corrupted_checks_arguments_before_yielding(crops, tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown corruption 'fogg'"):
        iter_corrupted(crops, tmp_path, names=["fog", "fogg"])
    with pytest.raises(ValueError, match=r"severity must be in 1\.\.5, got 9"):
        iter_corrupted(crops, tmp_path, severities=[1, 9])
    with pytest.raises(ValueError, match="NHWC"):
        iter_corrupted(crops[0], tmp_path)
    assert [n for n, _, _ in iter_corrupted(crops[:1], tmp_path, names="fog", severities=[1])] \
        == ["fog"]  # fmt: skip


# ------------------------------------------------------------------------------------- CLI


def test_cli_fills_cache_and_writes_preview(crops, tmp_path, capsys) -> None:
    npz = tmp_path / "test.npz"
    np.savez(npz, x=crops[:3], y=np.arange(3))
    cache, png = tmp_path / "cache", tmp_path / "grid.png"
    argv = ["--npz", str(npz), "--cache", str(cache), "--seed", "1",
            "--names", "contrast", "fog", "--severities", "1", "5"]  # fmt: skip
    assert corrupt_program.main([*argv, "--preview", str(png), "--preview-index", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count(": made") == 4 and "fog-5: made" in out and "table cifar" in out
    for name in ("contrast", "fog"):
        for s in (1, 5):
            arr = load_set(cache_path(crops[:3], cache, name, s, seed=1), crops[:3].shape)
            assert np.array_equal(arr, corrupt_images(crops[:3], name, s, seed=1))
    with Image.open(png) as grid:
        assert grid.mode == "RGB" and grid.width > 3 * 96 and grid.height > 2 * 96
    assert corrupt_program.main(argv) == 0
    assert capsys.readouterr().out.count(": cached") == 4


def test_cli_errors_and_module_entry_point(tmp_path, capsys) -> None:
    npz = tmp_path / "bad.npz"
    np.savez(npz, images=np.zeros((1, 8, 8, 3), np.uint8))
    assert corrupt_program.main(["--npz", str(npz), "--cache", str(tmp_path / "c")]) == 2
    assert "no array 'x'" in capsys.readouterr().err
    np.savez(npz, x=np.zeros((1, 8, 8, 3), np.uint8))
    argv = ["--npz", str(npz), "--cache", str(tmp_path), "--names", "fgo"]
    assert corrupt_program.main(argv) == 2
    assert "valid names" in capsys.readouterr().err
    done = subprocess.run(
        [sys.executable, "-m", "client.programs.corrupt", "--npz", str(npz), "--cache",
         str(tmp_path / "c"), "--names", "pixelate", "--severities", "3"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "pixelate-3: made" in done.stdout
