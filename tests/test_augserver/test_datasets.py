"""Datasets: CIFAR python batches, image folders, .npz arrays, and how bad files fail."""

from __future__ import annotations

import builtins
import io
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import skimage.data
from PIL import Image

from augserver.datasets import (
    FORMATS,
    Cifar10,
    Cifar100,
    Dataset,
    DatasetError,
    ImageFolder,
    NpzDataset,
    open_dataset,
)
from augserver.transforms import imagenet_train
from tests.service_helpers import REPO, cifar_rows, write_cifar10, write_cifar100, write_pickle

pytestmark = pytest.mark.unit

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "colorwheel")


def photo(name: str, width: int, height: int) -> np.ndarray:
    """A real scikit-image photo resized to ``width`` x ``height``."""
    img = Image.fromarray(getattr(skimage.data, name)())
    return np.asarray(img.resize((width, height), Image.BILINEAR))


@pytest.fixture(scope="module")
def tiny_photos() -> np.ndarray:
    """Six real photos at 32 x 32, N x H x W x 3."""
    return np.stack([photo(name, 32, 32) for name in PHOTOS])


# ---------------------------------------------------------------------------- CIFAR


def test_cifar10_layout(tmp_path: Path, tiny_photos: np.ndarray) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    batches = write_cifar10(folder, tiny_photos)
    for root in (folder, tmp_path):  # the extracted folder or its parent
        ds = Cifar10(root)
        assert len(ds) == 5 * len(tiny_photos)
        assert ds.num_classes == 10 and ds.classes[0] == "airplane" and ds.classes[9] == "truck"
        i = 2 * len(tiny_photos) + 1  # data_batch_3, position 1
        assert ds.path(i) == f"{folder / 'data_batch_3'}[1]"
        assert ds.label(i) == (2 + 1) % 10
        np.testing.assert_array_equal(ds.read(i), batches[2][1])
        np.testing.assert_array_equal(ds.read(0), tiny_photos[0])
    source = ds.read(3)
    assert source.shape == (32, 32, 3) and source.dtype == np.uint8
    assert not source.flags.writeable  # a view into the dataset, protected
    loaded = ds.load(3)
    loaded[:] = 0
    np.testing.assert_array_equal(ds.read(3), batches[0][3])
    test = Cifar10(folder, train=False)
    assert len(test) == len(tiny_photos) and test.path(0) == f"{folder / 'test_batch'}[0]"
    np.testing.assert_array_equal(test.read(0), batches[5][0])
    with pytest.raises(IndexError):
        ds.read(len(ds))


def test_cifar100_layout(tmp_path: Path, tiny_photos: np.ndarray) -> None:
    folder = tmp_path / "cifar-100-python"
    write_cifar100(folder, tiny_photos)
    ds = Cifar100(tmp_path)
    assert len(ds) == len(tiny_photos) and ds.num_classes == 100
    assert ds.classes[:2] == ["class0", "class1"]
    assert [ds.label(i) for i in range(3)] == [99, 98, 97]
    labels = ds.labels(np.array([2, 0, 2]))
    assert labels.dtype == np.int64 and labels.tolist() == [97, 99, 97]
    np.testing.assert_array_equal(ds.load(4), tiny_photos[4])
    test = Cifar100(folder, train=False)
    np.testing.assert_array_equal(test.read(0), tiny_photos[-1])
    assert test.path(0) == f"{folder / 'test'}[0]"


def test_cifar_files_pickled_by_python2_numpy(tmp_path: Path, tiny_photos: np.ndarray) -> None:
    """The real files name numpy.core.multiarray; loading them must not touch numpy.core."""
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder, tiny_photos)
    for name in ("data_batch_1", "test_batch"):
        data = (folder / name).read_bytes()
        old = b"cnumpy._core.multiarray\n_reconstruct\n"
        assert old in data
        (folder / name).write_bytes(data.replace(old, b"cnumpy.core.multiarray\n_reconstruct\n"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = Cifar10(folder)
    np.testing.assert_array_equal(ds.read(0), tiny_photos[0])


class Call:
    """Pickles as a call of ``fn(*args)``: what a malicious pickle does."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.fn, self.args


@pytest.mark.parametrize("attack", ["os.system", "builtins.exec", "numpy.save"])
def test_malicious_cifar_pickle_is_refused(
    tmp_path: Path, tiny_photos: np.ndarray, attack: str
) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder, tiny_photos)
    marker = tmp_path / "pwned"
    payload = {
        "os.system": Call(os.system, f"touch {marker}"),
        "builtins.exec": Call(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "numpy.save": Call(np.save, str(marker), np.zeros(1)),
    }[attack]
    evil = {b"data": cifar_rows(tiny_photos), b"labels": [0] * 6, b"filenames": payload}
    write_pickle(folder / "data_batch_2", evil)
    with pytest.raises(DatasetError, match="refusing to load global") as err:
        Cifar10(folder)
    assert err.value.path == str(folder / "data_batch_2") and err.value.index is None
    assert not list(tmp_path.glob("pwned*"))


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ({b"labels": [0] * 6}, "b'data'"),
        ({b"data": np.zeros((6, 3072), np.float32), b"labels": [0] * 6}, "b'data'"),
        ({b"data": np.zeros((6, 1024), np.uint8), b"labels": [0] * 6}, "N x 3072"),
        ({b"data": np.zeros((6, 3072), np.uint8), b"labels": [0] * 5}, "b'labels'"),
        ({b"data": np.zeros((6, 3072), np.uint8), b"labels": [0, 1, 2, 3, 4, 10]}, r"\[0, 10\)"),
        ([1, 2, 3], "expected a dict"),
    ],
)
def test_cifar_structure_is_validated(
    tmp_path: Path, tiny_photos: np.ndarray, batch: Any, match: str
) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder, tiny_photos)
    write_pickle(folder / "data_batch_4", batch)
    with pytest.raises(DatasetError, match=match) as err:
        Cifar10(folder)
    assert str(folder / "data_batch_4") in str(err.value)


def test_cifar_missing_and_corrupt_files(tmp_path: Path, tiny_photos: np.ndarray) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder, tiny_photos)
    good = (folder / "data_batch_5").read_bytes()
    (folder / "data_batch_5").write_bytes(good[: len(good) // 2])
    with pytest.raises(DatasetError, match="data_batch_5"):
        Cifar10(folder)
    (folder / "data_batch_5").write_bytes(b"")
    with pytest.raises(DatasetError, match="data_batch_5"):
        Cifar10(folder)
    (folder / "data_batch_5").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_5"):
        Cifar10(folder)
    Cifar10(folder, train=False)  # the test split does not need it
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Cifar10(tmp_path / "nowhere")


# ---------------------------------------------------------------------------- image folders


def save(path: Path, img: Image.Image, **params: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **params)
    return path


@pytest.fixture(scope="module")
def folder_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """An image folder with mixed-case extensions, hidden entries and every awkward mode.

    Returns the root and, per relative path, the RGB pixels ``load`` must produce (``None``
    where JPEG loss makes them approximate).
    """
    root = tmp_path_factory.mktemp("folder")
    rgb = photo("astronaut", 48, 40)
    grey = photo("camera", 48, 40)
    deep = (grey.astype(np.uint16) << 8) | 0x7F
    rgba = np.dstack([photo("coffee", 48, 40), np.linspace(0, 255, 48 * 40).reshape(40, 48)])
    palette = Image.fromarray(photo("chelsea", 48, 40)).convert("P")
    clear = palette.copy()
    clear.info["transparency"] = 0
    expected: dict[str, np.ndarray] = {}

    def add(rel: str, img: Image.Image, pixels: np.ndarray | None, **params: Any) -> None:
        save(root / rel, img, **params)
        expected[rel] = pixels

    add("cat/a.JPG", Image.fromarray(rgb), None, quality=95)
    add("cat/b.jpeg", Image.fromarray(photo("rocket", 48, 40)), None, quality=95)
    add("cat/c.Png", Image.fromarray(grey), np.repeat(grey[..., None], 3, axis=2))
    add("cat/d.bmp", Image.fromarray(rgb), rgb)
    add("cat/e.webp", Image.fromarray(rgb), rgb, lossless=True)
    add("cat/f_rgba.PNG", Image.fromarray(rgba.astype(np.uint8)), rgba[..., :3].astype(np.uint8))
    add("cat/sub/g.png", Image.fromarray(rgb), rgb)
    add("Dog/cmyk.jpg", Image.fromarray(rgb).convert("CMYK"), None, quality=95)
    add("Dog/deep.png", Image.fromarray(deep), np.repeat(grey[..., None], 3, axis=2))
    add("Dog/palette.png", palette, np.asarray(palette.convert("RGB")))
    add("Dog/palette_clear.png", clear, np.asarray(palette.convert("RGB")))
    # Entries that must be ignored.
    save(root / "cat/.hidden.jpg", Image.fromarray(rgb))
    save(root / "cat/.cache/h.png", Image.fromarray(rgb))
    save(root / ".trash/x/i.png", Image.fromarray(rgb))
    (root / "cat/notes.txt").write_text("not an image")
    (root / "cat/archive.tar.gz").write_bytes(b"\x1f\x8b")
    return root, expected


def test_image_folder_layout(folder_tree: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, _ = folder_tree
    ds = ImageFolder(root)
    assert ds.classes == ["Dog", "cat"] and ds.num_classes == 2  # sorted, as torchvision does
    rel = [os.path.relpath(ds.path(i), root) for i in range(len(ds))]
    assert rel == [
        "Dog/cmyk.jpg",
        "Dog/deep.png",
        "Dog/palette.png",
        "Dog/palette_clear.png",
        "cat/a.JPG",
        "cat/b.jpeg",
        "cat/c.Png",
        "cat/d.bmp",
        "cat/e.webp",
        "cat/f_rgba.PNG",
        "cat/sub/g.png",
    ]
    assert [ds.label(i) for i in range(len(ds))] == [0] * 4 + [1] * 7
    assert ds.labels(np.arange(len(ds))).tolist() == [0] * 4 + [1] * 7
    assert ds.labels(np.array([], np.int64)).shape == (0,)
    with pytest.raises(IndexError):
        ds.path(len(ds))
    for bad in (len(ds), -1):
        with pytest.raises(IndexError, match=f"sample index {bad} out of range for a dataset"):
            ds.labels(np.array([0, bad]))


def test_image_folder_read_is_lazy(folder_tree: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, _ = folder_tree
    ds = ImageFolder(root)
    i = [os.path.basename(ds.path(k)) for k in range(len(ds))].index("a.JPG")
    with ds.read(i) as img:
        assert isinstance(img, Image.Image) and img.format == "JPEG"
        assert img.tile, "read() must not decode"
    out = ds.sample(i, lambda src: imagenet_train(src, np.random.default_rng(0), size=32))
    assert out.shape == (32, 32, 3)


def test_image_folder_load_every_mode(folder_tree: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, expected = folder_tree
    ds = ImageFolder(root)
    rgb = photo("astronaut", 48, 40)
    for i in range(len(ds)):
        rel = os.path.relpath(ds.path(i), root)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = ds.load(i)
        assert out.shape == (40, 48, 3) and out.dtype == np.uint8, rel
        assert out.flags.writeable and out.flags.c_contiguous, rel
        if expected[rel] is not None:
            np.testing.assert_array_equal(out, expected[rel], err_msg=rel)
    cmyk = ds.load(0)
    with Image.open(root / "Dog/cmyk.jpg") as img:
        assert img.mode == "CMYK"
        np.testing.assert_array_equal(cmyk, np.asarray(img.convert("RGB")))
    assert np.abs(cmyk.astype(int) - rgb).mean() < 6  # the colours survived, not inverted


def test_image_folder_empty_and_missing(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no class folders") as err:
        ImageFolder(tmp_path)
    assert err.value.path == str(tmp_path)
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat/readme.txt").write_text("x")
    (tmp_path / "dog").mkdir()
    save(tmp_path / "dog/a.png", Image.fromarray(photo("chelsea", 8, 8)))
    with pytest.raises(DatasetError, match=r"no .*images in class folders \['cat'\]"):
        ImageFolder(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolder(tmp_path / "missing")


@pytest.fixture
def bad_folder(tmp_path: Path) -> tuple[ImageFolder, dict[str, int]]:
    """An image folder where every file but ok.png is broken in its own way."""
    jpeg = io.BytesIO()
    Image.fromarray(photo("coffee", 1024, 768)).save(jpeg, "JPEG", quality=90)
    png = io.BytesIO()
    Image.fromarray(photo("rocket", 64, 48)).save(png, "PNG")
    files = {
        "empty.jpg": b"",
        "garbage.png": np.random.default_rng(0).bytes(5000),
        "text.jpg": b"hello, I am not a JPEG\n" * 20,
        "truncated.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
        "truncated.png": png.getvalue()[: len(png.getvalue()) // 2],
        "vanished.jpg": jpeg.getvalue(),
        "ok.png": png.getvalue(),
    }
    (tmp_path / "cls").mkdir()
    for name, data in files.items():
        (tmp_path / "cls" / name).write_bytes(data)
    ds = ImageFolder(tmp_path)
    (tmp_path / "cls/vanished.jpg").unlink()
    return ds, {os.path.basename(ds.path(i)): i for i in range(len(ds))}


@pytest.mark.parametrize(
    "name",
    ["empty.jpg", "garbage.png", "text.jpg", "truncated.jpg", "truncated.png", "vanished.jpg"],
)
def test_bad_files_raise_dataset_error(
    bad_folder: tuple[ImageFolder, dict[str, int]], name: str
) -> None:
    ds, index = bad_folder
    i = index[name]

    def crop(source: Any) -> np.ndarray:
        return imagenet_train(source, np.random.default_rng(1))

    calls = [lambda: ds.load(i), lambda: ds.sample(i, crop)]
    if name in ("empty.jpg", "garbage.png", "text.jpg", "vanished.jpg"):
        calls.append(lambda: ds.read(i))  # already the header is unreadable
    for call in calls:
        with pytest.raises(DatasetError) as err:
            call()
        assert err.value.path == ds.path(i) and err.value.index == i
        assert f"sample {i} ({ds.path(i)})" in str(err.value)
    assert ds.load(index["ok.png"]).shape == (48, 64, 3)


def test_truncated_jpeg_raises_even_with_draft(
    bad_folder: tuple[ImageFolder, dict[str, int]],
) -> None:
    """Pillow may fill a truncated JPEG with grey; here it must fail, at any decode scale."""
    ds, index = bad_folder
    for seed in range(5):
        with pytest.raises(DatasetError, match="truncated"):
            ds.sample(
                index["truncated.jpg"],
                lambda s, r=seed: imagenet_train(s, np.random.default_rng(r), 64),
            )


def test_dataset_error_survives_pickling() -> None:
    err = pickle.loads(pickle.dumps(DatasetError("/data/x.jpg", 7, "OSError: broken")))
    assert (err.path, err.index, err.cause) == ("/data/x.jpg", 7, "OSError: broken")
    assert str(err) == "cannot read sample 7 (/data/x.jpg): OSError: broken"


# ---------------------------------------------------------------------------- npz


def test_npz_dataset(tmp_path: Path, tiny_photos: np.ndarray) -> None:
    path = tmp_path / "set.npz"
    np.savez(path, x=tiny_photos, y=np.arange(6) % 3, classes=np.array(["a", "b", "c"]))
    ds = NpzDataset(path)
    assert len(ds) == 6 and ds.num_classes == 3 and ds.classes == ["a", "b", "c"]
    assert ds.label(4) == 1 and ds.path(4) == f"{path}[4]"
    np.testing.assert_array_equal(ds.read(5), tiny_photos[5])
    assert not ds.read(5).flags.writeable and ds.load(5).flags.writeable

    grey = tiny_photos[..., 1]
    np.savez(tmp_path / "grey.npz", x=grey, y=np.array([0, 4, 1, 1, 2, 0], np.uint8))
    grey_ds = NpzDataset(tmp_path / "grey.npz")
    assert grey_ds.num_classes == 5 and grey_ds.classes == []
    np.testing.assert_array_equal(grey_ds.load(2), np.repeat(grey[2][..., None], 3, axis=2))


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"y": np.zeros(6, int)}, "missing key 'x'"),
        ({"x": "photos"}, "missing key 'y'"),
        ({"x": "float", "y": np.zeros(6, int)}, "key 'x'.*uint8"),
        ({"x": np.zeros((6, 8, 8, 2), np.uint8), "y": np.zeros(6, int)}, "key 'x'.*got"),
        ({"x": np.zeros((6, 8), np.uint8), "y": np.zeros(6, int)}, "key 'x'.*got"),
        ({"x": "photos", "y": np.zeros(5, int)}, r"key 'y'.*\(6,\)"),
        ({"x": "photos", "y": np.zeros((6, 1), int)}, r"key 'y'.*\(6,\)"),
        ({"x": "photos", "y": np.zeros(6, np.float32)}, "key 'y'.*integer"),
        ({"x": "photos", "y": np.array([0, 1, -1, 0, 0, 0])}, "key 'y'.*>= 0"),
        ({"x": "photos", "y": np.arange(6), "classes": np.array(["a"])}, "label 5"),
        ({"x": "objects", "y": np.zeros(6, int)}, "key 'x'.*pickle"),
    ],
)
def test_npz_validation(
    tmp_path: Path, tiny_photos: np.ndarray, arrays: dict[str, Any], match: str
) -> None:
    named = {
        "photos": tiny_photos,
        "float": tiny_photos.astype(np.float32),
        "objects": np.array([None] * 6, dtype=object),
    }
    path = tmp_path / "bad.npz"
    np.savez(path, **{k: named[v] if isinstance(v, str) else v for k, v in arrays.items()})
    with pytest.raises(DatasetError, match=match) as err:
        NpzDataset(path)
    assert err.value.path == str(path) and err.value.index is None


def test_npz_not_an_archive(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DatasetError, match=r"garbage\.npz"):
        NpzDataset(garbage)
    plain = tmp_path / "plain.npy"
    np.save(plain, np.zeros(3))
    with pytest.raises(DatasetError, match=r"not an \.npz archive"):
        NpzDataset(plain)
    with pytest.raises(FileNotFoundError, match=r"absent\.npz"):
        NpzDataset(tmp_path / "absent.npz")


# ---------------------------------------------------------------------------- open_dataset


def test_open_dataset(tmp_path: Path, tiny_photos: np.ndarray) -> None:
    write_cifar10(tmp_path / "c10" / "cifar-10-batches-py", tiny_photos)
    write_cifar100(tmp_path / "c100" / "cifar-100-python", tiny_photos)
    np.savez(tmp_path / "set.npz", x=tiny_photos, y=np.zeros(6, int))
    for split, count in (("train", 2), ("val", 1)):
        for k in range(count):
            save(tmp_path / "inet" / split / "n01" / f"{k}.JPEG", Image.fromarray(tiny_photos[k]))
    cases: list[tuple[str, str, bool, type[Dataset], int]] = [
        ("cifar10", "c10", True, Cifar10, 30),
        ("cifar10", "c10", False, Cifar10, 6),
        ("cifar100", "c100", True, Cifar100, 6),
        ("npz", "set.npz", True, NpzDataset, 6),
        ("imagefolder", "inet", True, ImageFolder, 2),
        ("imagefolder", "inet", False, ImageFolder, 1),
        ("imagefolder", "inet/train", True, ImageFolder, 2),
    ]
    for fmt, rel, train, cls, n in cases:
        ds = open_dataset(fmt, str(tmp_path / rel), train=train)
        assert type(ds) is cls and len(ds) == n, (fmt, rel, train)
    assert FORMATS == ("cifar10", "cifar100", "imagefolder", "npz", "webdataset")
    with pytest.raises(ValueError, match=r"'lmdb'.*cifar10, cifar100, imagefolder, npz"):
        open_dataset("lmdb", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nope"):
        open_dataset("imagefolder", str(tmp_path / "nope"))


def test_server_modules_never_import_torch() -> None:
    code = "import sys, augserver.datasets, augserver.transforms; sys.exit('torch' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
