"""Datasets the workers read: CIFAR-10/100 python batches, image folders, ``.npz`` arrays and
WebDataset tar shards (local, ``http(s)://`` or ``s3://``, see :mod:`augserver.shards`).

Every dataset has the same small interface (:class:`Dataset`): ``len``, ``label(i)``,
``labels(indices)``, ``path(i)`` (a human description of where sample ``i`` lives),
``read(i)`` (the source for :mod:`augserver.transforms`), ``load(i)`` (decoded RGB uint8) and
``sample(i, transform)``. Labels are held in memory.
A sample that cannot be read or decoded raises :class:`DatasetError` naming its path and index,
never garbage. Nothing here imports torch, and nothing is ever unpickled beyond the numpy
arrays, lists and strings that CIFAR batches contain.
"""

from __future__ import annotations

import _codecs
import errno
import hashlib
import io
import logging
import operator
import os
import pickle
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from augserver.errors import DatasetError
from augserver.shards import load_index
from augserver.storage import S3Options, open_store
from augserver.transforms import Source, to_rgb_array

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Decoders Image.open may use: the formats those extensions hold. (JPEG's opener also returns
# MPO, multi-picture JPEG, images; transforms treat both formats alike.)
_PIL_FORMATS = ("JPEG", "PNG", "BMP", "WEBP")


def _digest(data: Any) -> str:
    if isinstance(data, str):
        data = data.encode()
    return hashlib.sha256(data).hexdigest()[:16]


def fingerprint_mismatch(mine: dict[str, str], theirs: dict[str, str]) -> str | None:
    """A sentence naming every part of two dataset fingerprints that differs, or None."""
    names = sorted(set(mine) | set(theirs))
    differ = [n for n in names if mine.get(n) != theirs.get(n)]
    if not differ:
        return None
    described = []
    for name in differ:
        if name == "samples":
            described.append(f"{theirs.get(name, '?')} samples here, {mine.get(name, '?')} at "
                             "the dispatcher")
        elif name.startswith("class ") and (name not in mine or name not in theirs):
            described.append(f"{name} exists only {'here' if name in theirs else 'there'}")
        else:
            described.append(f"{name} differs")
    return "the dataset differs from the dispatcher's: " + "; ".join(described)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _require_exists(path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "dataset path not found", path)


class Dataset(ABC):
    """Common interface of all datasets; indices run from 0 to ``len(self) - 1``."""

    classes: list[str]
    num_classes: int
    _labels: np.ndarray
    """Every sample's class index, in memory (int64, one per sample)."""

    @abstractmethod
    def __len__(self) -> int: ...

    def label(self, i: int) -> int:
        """Class index of sample ``i``."""
        return int(self._labels[self._index(i)])

    def labels(self, indices: np.ndarray) -> np.ndarray:
        """Class indices (int64) of the samples ``indices``, in one array operation."""
        indices = np.asarray(indices)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            bad = indices[(indices < 0) | (indices >= len(self))][0]
            raise IndexError(f"sample index {bad} out of range for a dataset of {len(self)}")
        return self._labels[indices]

    def fingerprint(self) -> dict[str, str]:
        """What identifies this dataset's content, part by part (``samples``, ``classes`` and
        the parts :meth:`_content` names): the same for every host's view of the same data,
        different when a file, a size, a pixel or a label changed. Computed once."""
        if getattr(self, "_fingerprint", None) is None:
            parts = {"samples": str(len(self)),
                     "classes": _digest("\n".join(self.classes) or str(self.num_classes))}
            parts.update(self._content())
            self._fingerprint = parts
        return dict(self._fingerprint)

    def _content(self) -> dict[str, str]:
        return {"labels": _digest(self._labels.tobytes())}

    @abstractmethod
    def path(self, i: int) -> str:
        """Where sample ``i`` lives, for humans: a file path, or ``file[k]`` inside a file."""

    @abstractmethod
    def read(self, i: int) -> Source:
        """Source image of sample ``i`` for preprocessing (a PIL image may be undecoded)."""

    @abstractmethod
    def load(self, i: int) -> np.ndarray:
        """Sample ``i`` fully decoded: a writable uint8 ``H x W x 3`` RGB array."""

    def encoded(self, i: int) -> tuple[bytes, str]:
        """Sample ``i`` as an image file's bytes and its extension, for ``augserver shard``:
        the original bytes where the dataset has them, else lossless PNG of :meth:`load`."""
        i = self._index(i)
        with self._reading(i):
            out = io.BytesIO()
            Image.fromarray(self.load(i)).save(out, format="PNG")
            return out.getvalue(), "png"

    def prefetch(self, indices: Sequence[int]) -> None:
        """Start reading ``indices`` ahead of :meth:`read` (a batch's samples, for datasets
        whose reads wait on a network); the default does nothing."""
        return None

    def sample(self, i: int, transform: Callable[[Source], np.ndarray]) -> np.ndarray:
        """``transform(self.read(i))``, with any failure to read or decode sample ``i``
        (including a lazy decode inside ``transform``) raised as :class:`DatasetError`."""
        i = self._index(i)
        with self._reading(i):
            source = self.read(i)
            try:
                return transform(source)
            finally:
                if isinstance(source, Image.Image):
                    source.close()

    def _index(self, i: int) -> int:
        i, n = operator.index(i), len(self)
        if not 0 <= i < n:
            raise IndexError(f"sample index {i} out of range for a dataset of {n}")
        return i

    @contextmanager
    def _reading(self, i: int) -> Iterator[None]:
        """Turn any exception raised while reading sample ``i`` into DatasetError."""
        try:
            yield
        except DatasetError:
            raise
        except Exception as exc:
            raise DatasetError(self.path(i), i, _describe(exc)) from exc


# ---------------------------------------------------------------------------- arrays in memory


class ArrayDataset(Dataset):
    """Samples held in memory as one read-only ``N x H x W x 3`` uint8 array.

    ``sources`` lists ``(file, count)`` in sample order so that ``path(i)`` can name the file
    and the position inside it.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        sources: Sequence[tuple[str, int]],
        num_classes: int,
        classes: list[str] | None = None,
    ) -> None:
        images.setflags(write=False)
        self._images = images
        self._labels = labels.astype(np.int64, copy=False)
        self._files = [name for name, _ in sources]
        self._starts = np.cumsum([0] + [count for _, count in sources])
        self.num_classes = num_classes
        self.classes = classes or []

    def __len__(self) -> int:
        return len(self._images)

    def path(self, i: int) -> str:
        """``file[k]``: the file holding sample ``i`` and its position in that file."""
        i = self._index(i)
        f = int(np.searchsorted(self._starts, i, side="right")) - 1
        return f"{self._files[f]}[{i - self._starts[f]}]"

    def _content(self) -> dict[str, str]:
        """The pixels and labels, hashed."""
        return {"pixels": _digest(np.ascontiguousarray(self._images).data),
                "labels": _digest(self._labels.tobytes())}

    def read(self, i: int) -> np.ndarray:
        """A read-only ``H x W x 3`` view of sample ``i``."""
        return self._images[self._index(i)]

    def load(self, i: int) -> np.ndarray:
        """A writable copy of sample ``i``."""
        return self.read(i).copy()


# ---------------------------------------------------------------------------- CIFAR


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else callable."""

    _RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's ndarray reconstructor
    _ALLOWED: ClassVar[dict[tuple[str, str], Any]] = {
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _codecs.encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def _load_cifar_pickle(path: str) -> dict[bytes, Any]:
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as exc:
        raise DatasetError(path, None, _describe(exc)) from exc
    if not isinstance(obj, dict):
        raise DatasetError(path, None, f"expected a dict, got {type(obj).__name__}")
    return obj


@dataclass(frozen=True)
class _CifarLayout:
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes
    num_classes: int


_CIFAR10 = _CifarLayout(
    "cifar-10-batches-py",
    tuple(f"data_batch_{k}" for k in range(1, 6)),
    ("test_batch",),
    "batches.meta",
    b"labels",
    b"label_names",
    10,
)
_CIFAR100 = _CifarLayout(
    "cifar-100-python", ("train",), ("test",), "meta", b"fine_labels", b"fine_label_names", 100
)


def _cifar_labels(batch: dict[bytes, Any], key: bytes, n: int, limit: int, path: str) -> list[int]:
    labels = batch.get(key)
    if not isinstance(labels, list | np.ndarray) or len(labels) != n:
        raise DatasetError(path, None, f"key {key!r}: expected {n} labels")
    array = np.asarray(labels)
    if n and (array.dtype.kind not in "iu" or not 0 <= array.min() <= array.max() < limit):
        raise DatasetError(path, None, f"key {key!r}: labels must be integers in [0, {limit})")
    return array.tolist()


def _cifar_images(batch: dict[bytes, Any], path: str) -> np.ndarray:
    data = batch.get(b"data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DatasetError(path, None, "key b'data': expected a uint8 N x 3072 array")
    if data.shape[1] != 3 * 32 * 32:
        raise DatasetError(path, None, f"key b'data': expected N x 3072, got {data.shape}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _cifar_folder(root: str, layout: _CifarLayout) -> str:
    """``root`` itself, or ``root/<extracted folder>`` when that exists."""
    nested = os.path.join(root, layout.folder)
    if os.path.isdir(nested):
        return nested
    _require_exists(root)
    return root


def _cifar_class_names(meta_path: str, layout: _CifarLayout) -> list[str]:
    """Class names from the meta file, or [] when it is absent."""
    if not os.path.exists(meta_path):
        return []
    names = _load_cifar_pickle(meta_path).get(layout.names_key)
    if not isinstance(names, list) or len(names) != layout.num_classes:
        msg = f"key {layout.names_key!r}: expected a list of {layout.num_classes} names"
        raise DatasetError(meta_path, None, msg)
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


class _Cifar(ArrayDataset):
    """A CIFAR python-batch split, converted once to N x 32 x 32 x 3 uint8 at open."""

    LAYOUT: _CifarLayout

    def __init__(self, root: str | os.PathLike[str], train: bool = True) -> None:
        layout = self.LAYOUT
        folder = _cifar_folder(os.fspath(root), layout)
        names = layout.train_files if train else layout.test_files
        paths = [os.path.join(folder, name) for name in names]
        for p in paths:
            _require_exists(p)
        batches = [_load_cifar_pickle(p) for p in paths]
        planar = [_cifar_images(b, p) for b, p in zip(batches, paths, strict=True)]
        images = np.empty((sum(len(x) for x in planar), 32, 32, 3), np.uint8)
        labels: list[int] = []
        for batch, x, p in zip(batches, planar, paths, strict=True):
            images[len(labels) : len(labels) + len(x)] = x  # the one CHW -> HWC copy
            labels += _cifar_labels(batch, layout.label_key, len(x), layout.num_classes, p)
        super().__init__(
            images,
            np.asarray(labels, np.int64),
            [(p, len(x)) for p, x in zip(paths, planar, strict=True)],
            layout.num_classes,
            _cifar_class_names(os.path.join(folder, layout.meta_file), layout),
        )


class Cifar10(_Cifar):
    """CIFAR-10 (``data_batch_1..5`` / ``test_batch`` / ``batches.meta``) at ``root``, which may
    be the extracted ``cifar-10-batches-py`` folder or its parent."""

    LAYOUT = _CIFAR10


class Cifar100(_Cifar):
    """CIFAR-100 (``train`` / ``test`` / ``meta``, fine labels) at ``root``, which may be the
    extracted ``cifar-100-python`` folder or its parent."""

    LAYOUT = _CIFAR100


# ---------------------------------------------------------------------------- image folders


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _class_files(root: str, class_name: str) -> list[str]:
    """Image files under ``root/class_name`` (recursively, sorted, hidden entries skipped),
    as paths relative to ``root``."""
    files = []
    top = os.path.join(root, class_name)
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        dirnames[:] = sorted(filter(_visible, dirnames))
        for name in sorted(filter(_visible, filenames)):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                files.append(os.path.relpath(os.path.join(dirpath, name), root))
    return files


class _EncodedImages(Dataset):
    """A dataset whose :meth:`read` opens an encoded image (undecoded PIL image)."""

    @abstractmethod
    def read(self, i: int) -> Image.Image: ...

    def load(self, i: int) -> np.ndarray:
        """Sample ``i`` decoded to RGB uint8."""
        i = self._index(i)
        with self._reading(i), self.read(i) as img:
            img.load()
            return to_rgb_array(img)


class ImageFolder(_EncodedImages):
    """``root/<class>/<image>``: sorted class folder names give the labels, files are sorted
    within each class; extensions jpg, jpeg, png, bmp, webp in any case; hidden entries skipped.

    ``read(i)`` returns the opened but undecoded PIL image, so that JPEGs can be decoded at
    reduced scale by :func:`augserver.transforms.imagenet_train`.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.fspath(root)
        _require_exists(self.root)
        with os.scandir(self.root) as entries:
            classes = sorted(e.name for e in entries if e.is_dir() and _visible(e.name))
        if not classes:
            raise DatasetError(self.root, None, "no class folders (expected ROOT/<class>/<image>)")
        per_class = [_class_files(self.root, c) for c in classes]
        empty = [c for c, files in zip(classes, per_class, strict=True) if not files]
        if empty:
            exts = ", ".join(IMAGE_EXTENSIONS)
            raise DatasetError(self.root, None, f"no {exts} images in class folders {empty}")
        self.classes = classes
        self.num_classes = len(classes)
        # One fixed-width bytes array instead of a million Python strings: compact and
        # copy-on-write friendly in forked workers.
        self._files = np.array([os.fsencode(f) for files in per_class for f in files], np.bytes_)
        counts = [len(f) for f in per_class]
        self._labels = np.repeat(np.arange(len(classes), dtype=np.int64), counts)

    def __len__(self) -> int:
        return len(self._files)

    def _content(self) -> dict[str, str]:
        """Per class folder: its files' paths and sizes, hashed (one stat per file)."""
        parts = {}
        for label, name in enumerate(self.classes):
            lines = []
            for f in self._files[self._labels == label]:
                path = os.path.join(os.fsencode(self.root), f)
                try:
                    size = os.stat(path).st_size
                except OSError:
                    size = -1
                lines.append(f + b"\0" + str(size).encode())
            parts[f"class {name}"] = _digest(b"\n".join(lines))
        return parts

    def path(self, i: int) -> str:
        """Full path of sample ``i``'s file."""
        return os.path.join(self.root, os.fsdecode(self._files[self._index(i)]))

    def read(self, i: int) -> Image.Image:
        """Sample ``i`` opened (header parsed) but not decoded."""
        i = self._index(i)
        with self._reading(i):
            return Image.open(self.path(i), formats=_PIL_FORMATS)

    def encoded(self, i: int) -> tuple[bytes, str]:
        """The file's own bytes and its extension (lower case)."""
        path = self.path(i)
        with self._reading(i), open(path, "rb") as f:
            return f.read(), os.path.splitext(path)[1][1:].lower()


# ---------------------------------------------------------------------------- tar shards


READS_IN_FLIGHT = 16
"""Byte-range reads one worker keeps in flight while it makes a batch from shards."""


class WebDataset(_EncodedImages):
    """WebDataset tar shards (see :mod:`augserver.shards`): an index file or a brace pattern,
    on a local path, ``http(s)://`` or ``s3://``. Each image is read with one byte-range
    request; :meth:`prefetch` keeps :data:`READS_IN_FLIGHT` of a batch's reads in flight so
    that object-store latency does not stall the worker, and holds no more than one batch."""

    def __init__(self, path: str, s3: S3Options | None = None) -> None:
        self.root = path
        self.store = open_store(path, s3)
        self.index, self.urls = load_index(self.store, path)
        if self.index.crc is None:
            logging.getLogger("augserver.datasets").warning(
                "%s is a version 1 shard index: image bytes are not checked against it (a shard "
                "rewritten with its length kept would go unnoticed); index the shards again "
                "with augserver shard", path)
        self.classes = self.index.classes
        self.num_classes = len(self.classes)
        self._labels = self.index.labels
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: dict[int, Future[bytes]] = {}

    def __len__(self) -> int:
        return len(self.index)

    def _content(self) -> dict[str, str]:
        return {"shards": self.index.digest()}

    def path(self, i: int) -> str:
        """``SHARD:KEY.EXT``: the shard's path or URL and the image's member."""
        i = self._index(i)
        ix = self.index
        return f"{self.urls[ix.shard[i]]}:{ix.keys[i]}.{ix.exts[i]}"

    def _fetch(self, i: int) -> bytes:
        ix = self.index
        size = int(ix.size[i])
        data = self.store.read(self.urls[ix.shard[i]], int(ix.offset[i]), size)
        if len(data) != size:
            raise DatasetError(self.path(i), i, f"read {len(data)} of {size} bytes: the shard "
                                                "is truncated")
        ix.check_content(i, data, self.path(i))
        return data

    def prefetch(self, indices: Sequence[int]) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(READS_IN_FLIGHT, thread_name_prefix="shard-read")
        for future in self._ahead.values():
            future.cancel()
        self._ahead = {int(i): self._pool.submit(self._fetch, int(i))
                       for i in indices if 0 <= i < len(self)}

    def read(self, i: int) -> Image.Image:
        """Sample ``i``'s image opened (header parsed) but not decoded."""
        i = self._index(i)
        with self._reading(i):
            future = self._ahead.pop(i, None)
            data = future.result() if future is not None else self._fetch(i)
            return Image.open(io.BytesIO(data), formats=_PIL_FORMATS)

    def encoded(self, i: int) -> tuple[bytes, str]:
        i = self._index(i)
        with self._reading(i):
            return self._fetch(i), self.index.exts[i]


# ---------------------------------------------------------------------------- npz arrays


def _npz_array(archive: Any, path: str, key: str) -> np.ndarray:
    if key not in archive.files:
        raise DatasetError(path, None, f"missing key {key!r} (keys: {sorted(archive.files)})")
    try:
        return archive[key]
    except Exception as exc:
        raise DatasetError(path, None, f"key {key!r}: {_describe(exc)}") from exc


def _npz_images(x: np.ndarray, path: str) -> np.ndarray:
    """Validate ``x`` (uint8 NHWC with 3 channels, or NHW / NHW1 grey) and return it as RGB."""
    if x.dtype != np.uint8:
        raise DatasetError(path, None, f"key 'x': expected uint8, got {x.dtype}")
    if x.ndim == 4 and x.shape[3] == 1:
        x = x[..., 0]
    if x.ndim == 3:
        return np.repeat(x[..., None], 3, axis=3)
    if x.ndim == 4 and x.shape[3] == 3:
        return np.ascontiguousarray(x)
    raise DatasetError(path, None, f"key 'x': expected N x H x W x 3 or N x H x W, got {x.shape}")


def _npz_labels(y: np.ndarray, n: int, path: str) -> np.ndarray:
    if y.ndim != 1 or len(y) != n:
        raise DatasetError(path, None, f"key 'y': expected shape ({n},), got {y.shape}")
    if y.dtype.kind not in "iu":
        raise DatasetError(path, None, f"key 'y': expected integer labels, got {y.dtype}")
    if n and y.min() < 0:
        raise DatasetError(path, None, "key 'y': labels must be >= 0")
    return y.astype(np.int64)


class NpzDataset(ArrayDataset):
    """A ``.npz`` file with ``x`` (uint8 N x H x W x 3, or N x H x W grey) and ``y`` (integer
    labels); an optional ``classes`` string array names the classes. Loaded without pickle."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = os.fspath(path)
        _require_exists(path)
        try:
            archive = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise DatasetError(path, None, _describe(exc)) from exc
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise DatasetError(path, None, "not an .npz archive")
        with archive:
            x = _npz_images(_npz_array(archive, path, "x"), path)
            y = _npz_labels(_npz_array(archive, path, "y"), len(x), path)
            names = _npz_array(archive, path, "classes") if "classes" in archive.files else None
        classes = [] if names is None else [str(c) for c in names.ravel()]
        num_classes = max(len(classes), int(y.max()) + 1 if len(y) else 0)
        if classes and num_classes > len(classes):
            raise DatasetError(path, None, f"key 'y': label {num_classes - 1} has no class name")
        super().__init__(x, y, [(path, len(x))], num_classes, classes)


# ---------------------------------------------------------------------------- open by name


def _image_folder_split(path: str, train: bool) -> str:
    """``path/train`` or ``path/val`` when ``path`` holds both (the ImageNet layout)."""
    if all(os.path.isdir(os.path.join(path, s)) for s in ("train", "val")):
        return os.path.join(path, "train" if train else "val")
    return path


_FORMATS: dict[str, Callable[[str, bool, S3Options | None], Dataset]] = {
    "cifar10": lambda path, train, s3: Cifar10(path, train),
    "cifar100": lambda path, train, s3: Cifar100(path, train),
    "imagefolder": lambda path, train, s3: ImageFolder(_image_folder_split(path, train)),
    "npz": lambda path, train, s3: NpzDataset(path),
    "webdataset": lambda path, train, s3: WebDataset(path, s3),
}
FORMATS = tuple(_FORMATS)


def open_dataset(
    format: str, path: str | os.PathLike[str], train: bool = True, s3: S3Options | None = None
) -> Dataset:
    """Open the dataset at ``path``; ``format`` is one of :data:`FORMATS`.

    ``train`` picks the CIFAR split, or ``path/train`` vs ``path/val`` for an image folder that
    holds both; a ``.npz`` file or a set of shards is one split and ignores it. ``s3`` is the
    job's ``dataset.s3`` for shards in an S3-compatible store.
    """
    try:
        factory = _FORMATS[format]
    except KeyError:
        raise ValueError(
            f"unknown dataset format {format!r}; valid formats: {', '.join(FORMATS)}"
        ) from None
    path = os.fspath(path)
    if format != "webdataset":  # shards may be remote, and are checked one by one
        _require_exists(path)
    return factory(path, train, s3)

