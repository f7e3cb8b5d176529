"""WebDataset tar shards: their index, and turning a dataset into shards.

A shard is a tar file whose members are grouped by key: ``KEY.jpg`` (or ``jpeg``, ``png``,
``webp``, ``bmp``) holds the image and ``KEY.cls`` its integer label (or ``KEY.json`` a map with
a ``label`` or ``cls`` field), the layout timm, webdataset and many published datasets use. The
key is the member's path up to the first dot of its file name.

Training needs random access (the plan reads sample ``i`` of any shard), so a
:class:`ShardIndex` records, for every sample in order, its shard, the byte offset and size of
its image inside the tar, the image's extension and its label; a worker then reads one image
with one byte-range request. ``augserver shard`` writes the index next to the shards
(``DEST.index.json``); for shards named by a brace pattern (``train-{000000..000127}.tar``) it
is built on first use by reading each shard once, and cached on local disk keyed by the shards'
names and sizes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from augserver.errors import DatasetError
from augserver.storage import LocalStore, StorageError, Store, is_remote, join

INDEX_SUFFIX = ".index.json"
INDEX_FORMAT = "augserver-shards"
INDEX_VERSION = 2
"""2: a CRC-32 of every image (``crc``), checked on every read. 1: no content check."""
INDEX_VERSIONS = (1, 2)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


class Encodable(Protocol):
    """What :func:`write_shards` needs of a dataset (:class:`augserver.datasets.Dataset`)."""

    classes: list[str]
    num_classes: int

    def __len__(self) -> int: ...
    def label(self, i: int) -> int: ...
    def encoded(self, i: int) -> tuple[bytes, str]: ...


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> ``a-000.tar, a-001.tar, a-002.tar`` (zero-padded to the first
    number's width; several ranges expand left to right)."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    first, last = match.group(1), match.group(2)
    if int(last) < int(first):
        raise ValueError(f"{pattern}: the range {{{first}..{last}}} is empty")
    head, tail = pattern[: match.start()], pattern[match.end():]
    width = len(first)
    return [name for n in range(int(first), int(last) + 1)
            for name in expand_braces(f"{head}{n:0{width}d}{tail}")]


@dataclass(frozen=True)
class Shard:
    name: str  # relative to the index, or a full URL/path for a brace pattern
    size: int
    samples: int


@dataclass
class ShardIndex:
    """Every sample of a set of shards, in order: where its image is and its label."""

    classes: list[str]
    shards: list[Shard]
    shard: np.ndarray  # int32: the shard of each sample
    offset: np.ndarray  # int64: the image's first byte in its shard
    size: np.ndarray  # int64: the image's bytes
    labels: np.ndarray  # int64
    keys: list[str]
    exts: list[str]
    crc: np.ndarray | None = None  # int64: the CRC-32 of each image's bytes (None: version 1)

    def __len__(self) -> int:
        return len(self.labels)

    def to_json(self) -> bytes:
        samples = {"shard": self.shard.tolist(), "offset": self.offset.tolist(),
                   "size": self.size.tolist(), "label": self.labels.tolist(),
                   "key": self.keys, "ext": self.exts}
        if self.crc is not None:
            samples["crc"] = self.crc.tolist()
        return json.dumps({
            "format": INDEX_FORMAT, "version": INDEX_VERSION if self.crc is not None else 1,
            "classes": self.classes,
            "shards": [{"name": s.name, "size": s.size, "samples": s.samples}
                       for s in self.shards],
            "samples": samples,
        }, separators=(",", ":")).encode()

    def check_content(self, i: int, data: bytes, where: str) -> None:
        """Raise :class:`DatasetError` naming ``where`` (the shard and the key) when
        ``data`` is not the bytes sample ``i`` had when the shards were indexed."""
        if self.crc is not None and zlib.crc32(data) != int(self.crc[i]):
            raise DatasetError(where, i, "its bytes differ from the shard index (CRC-32): the "
                                         "shard was rewritten after it was indexed; index it "
                                         "again (augserver shard) or restore it")

    @classmethod
    def from_json(cls, data: bytes, where: str) -> ShardIndex:
        """The index in ``data``; :class:`DatasetError` naming ``where`` when it is not one."""
        try:
            raw = json.loads(data)
            if raw.get("format") != INDEX_FORMAT or raw.get("version") not in INDEX_VERSIONS:
                raise ValueError(f"not an {INDEX_FORMAT} index of version "
                                 f"{' or '.join(map(str, INDEX_VERSIONS))}")
            samples = raw["samples"]
            index = cls(
                classes=[str(c) for c in raw["classes"]],
                shards=[Shard(str(s["name"]), int(s["size"]), int(s["samples"]))
                        for s in raw["shards"]],
                shard=np.asarray(samples["shard"], np.int32),
                offset=np.asarray(samples["offset"], np.int64),
                size=np.asarray(samples["size"], np.int64),
                labels=np.asarray(samples["label"], np.int64),
                keys=[str(k) for k in samples["key"]], exts=[str(e) for e in samples["ext"]],
                crc=(np.asarray(samples["crc"], np.int64) if raw["version"] >= 2 else None))
            index.check()
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DatasetError(where, None, f"not a valid shard index: {exc}") from None
        return index

    def check(self) -> None:
        """Raise ValueError unless the columns agree with each other and with the shards."""
        n = len(self.labels)
        if not (len(self.shard) == len(self.offset) == len(self.size) == len(self.keys)
                == len(self.exts) == n) or (self.crc is not None and len(self.crc) != n):
            raise ValueError("the sample columns differ in length")
        if n == 0:
            raise ValueError("no samples")
        counts = np.bincount(self.shard, minlength=len(self.shards))
        if len(counts) != len(self.shards) or any(
                c != s.samples for c, s in zip(counts, self.shards, strict=True)):
            raise ValueError("the shards' sample counts do not match the samples")
        if self.labels.min() < 0 or self.labels.max() >= len(self.classes):
            raise ValueError(f"labels outside the {len(self.classes)} classes")
        ends = self.offset + self.size
        sizes = np.array([s.size for s in self.shards], np.int64)
        if self.offset.min() < 0 or np.any(ends > sizes[self.shard]):
            raise ValueError("an image lies outside its shard")

    def digest(self) -> str:
        """What identifies these shards' content: the index itself, hashed."""
        return hashlib.sha256(self.to_json()).hexdigest()[:16]


# ---------------------------------------------------------------------------- reading a tar


@dataclass
class _Member:
    key: str
    ext: str
    offset: int
    size: int


def _members(data: bytes, name: str) -> Iterator[_Member]:
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                folder, _, base = info.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot or not stem:
                    continue
                key = f"{folder}/{stem}" if folder else stem
                yield _Member(key, ext.lower(), info.offset_data, info.size)
    except tarfile.TarError as exc:
        raise DatasetError(name, None, f"not a readable tar shard: {exc}") from None


def _label(data: bytes, ext: str) -> int:
    if ext == "cls":
        return int(data.strip())
    value = json.loads(data)
    label = value.get("label", value.get("cls")) if isinstance(value, dict) else None
    if isinstance(label, bool) or not isinstance(label, int):
        raise ValueError("no integer 'label' or 'cls' field")
    return label


def index_shard(data: bytes, name: str) -> list[tuple[str, str, int, int, int, int]]:
    """The samples of one shard's bytes, in member order: ``(key, ext, offset, size, label,
    crc)``, ``crc`` the CRC-32 of the image's bytes.
    A key without an image or without a label is a :class:`DatasetError` naming both."""
    images: dict[str, _Member] = {}
    labels: dict[str, int] = {}
    order: list[str] = []
    for member in _members(data, name):
        if member.key not in images and member.key not in labels:
            order.append(member.key)
        if member.ext in IMAGE_EXTS:
            images[member.key] = member
        elif member.ext in ("cls", "json") and member.key not in labels:
            body = data[member.offset: member.offset + member.size]
            try:
                labels[member.key] = _label(body, member.ext)
            except (ValueError, UnicodeDecodeError) as exc:
                raise DatasetError(f"{name}:{member.key}.{member.ext}", None,
                                   f"unreadable label: {exc}") from None
    samples = []
    for key in order:
        if key not in images and key not in labels:
            continue  # other members (.txt, ...) of keys that are not samples
        if key not in images:
            raise DatasetError(f"{name}:{key}", None,
                               f"no image ({', '.join(IMAGE_EXTS)}) for this key")
        if key not in labels:
            raise DatasetError(f"{name}:{key}", None, "no label (.cls or .json) for this key")
        m = images[key]
        image = data[m.offset: m.offset + m.size]
        samples.append((key, m.ext, m.offset, m.size, labels[key], zlib.crc32(image)))
    return samples


Row = tuple[int, str, str, int, int, int, int]
"""One sample of an index being built: ``(shard number, key, ext, offset, size, label,
crc)``."""


def _from_rows(classes: list[str], shards: list[Shard], rows: list[Row]) -> ShardIndex:
    index = ShardIndex(
        classes=classes, shards=shards,
        shard=np.array([r[0] for r in rows], np.int32),
        offset=np.array([r[3] for r in rows], np.int64),
        size=np.array([r[4] for r in rows], np.int64),
        labels=np.array([r[5] for r in rows], np.int64),
        keys=[r[1] for r in rows], exts=[r[2] for r in rows],
        crc=np.array([r[6] for r in rows], np.int64))
    index.check()
    return index


def build_index(store: Store, urls: list[str]) -> ShardIndex:
    """An index of the shards at ``urls``, reading each once; the classes are the labels'
    numbers (shards do not name them)."""
    shards: list[Shard] = []
    rows: list[Row] = []
    for number, url in enumerate(urls):
        data = store.read(url)
        samples = index_shard(data, url)
        shards.append(Shard(url, len(data), len(samples)))
        rows += [(number, *sample) for sample in samples]
    if not rows:
        raise DatasetError(urls[0], None, "the shards hold no samples")
    classes = [str(c) for c in range(max(r[5] for r in rows) + 1)]
    return _from_rows(classes, shards, rows)


def index_cache_dir() -> Path:
    """Where indexes built on first use are kept (``AUGSERVER_CACHE`` or ~/.cache/augserver)."""
    base = os.environ.get("AUGSERVER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "augserver")
    return Path(base) / "shard-index"


SIZE_LOOKUPS = 16
"""Shard sizes asked for at once when a dataset opens (one request each in an object store)."""


def _sizes(store: Store, urls: list[str]) -> list[int]:
    """Each shard's size; a shard that cannot be found is a :class:`DatasetError` naming it."""
    def size(url: str) -> int:
        try:
            return store.size(url)
        except StorageError as exc:
            raise DatasetError(url, None, f"shard unavailable: {exc}") from None

    with ThreadPoolExecutor(SIZE_LOOKUPS) as pool:
        return list(pool.map(size, urls))


def load_index(store: Store, path: str) -> tuple[ShardIndex, list[str]]:
    """The index of ``path`` (an index file, or a brace pattern of shards) and the URL of each
    shard. Every shard's size is checked against the index: a missing or truncated shard is a
    :class:`DatasetError` naming it."""
    if not path.endswith(INDEX_SUFFIX):
        urls = expand_braces(path)
        if not all(u.endswith(".tar") for u in urls):
            raise DatasetError(path, None, "webdataset path must name .tar shards (a brace "
                                           "pattern) or an index file ending in .index.json")
        return _cached_index(store, urls, _sizes(store, urls)), urls
    try:
        data = store.read(path)
    except StorageError as exc:
        raise DatasetError(path, None, f"cannot read the shard index: {exc}") from None
    index = ShardIndex.from_json(data, path)
    urls = [s.name if is_remote(s.name) or os.path.isabs(s.name) else join(path, s.name)
            for s in index.shards]
    for url, shard, size in zip(urls, index.shards, _sizes(store, urls), strict=True):
        if size != shard.size:
            raise DatasetError(url, None, f"shard is {size} bytes but the index says "
                                          f"{shard.size}: truncated or replaced")
    return index, urls


def _cached_index(store: Store, urls: list[str], sizes: list[int]) -> ShardIndex:
    """The index of the shards at ``urls``, from the local cache when one was built for
    these names and sizes, else built now and cached."""
    key = hashlib.sha256(json.dumps([urls, sizes, INDEX_VERSION]).encode()).hexdigest()[:24]
    cached = index_cache_dir() / f"{key}.json"
    if cached.is_file():
        return ShardIndex.from_json(cached.read_bytes(), str(cached))
    index = build_index(store, urls)
    LocalStore().write(str(cached), index.to_json())
    return index


# ---------------------------------------------------------------------------- writing shards


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # the same source gives the same shard bytes
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Writes samples into ``DEST-000000.tar``, ``DEST-000001.tar``, ... of about
    ``shard_bytes`` each through ``store``, then ``DEST.index.json``."""

    def __init__(self, store: Store, dest: str, shard_bytes: int, classes: list[str]) -> None:
        self.store, self.dest, self.shard_bytes, self.classes = store, dest, shard_bytes, classes
        self.shards: list[Shard] = []
        self.rows: list[Row] = []
        self._buffer: io.BytesIO | None = None
        self._tar: tarfile.TarFile | None = None
        self._count = 0

    def _name(self, number: int) -> str:
        return f"{os.path.basename(self.dest.rstrip('/'))}-{number:06d}.tar"

    def add(self, key: str, ext: str, image: bytes, label: int) -> None:
        """One sample: its image's encoded bytes (``ext`` names the format) and its label."""
        if self._tar is None:
            self._buffer = io.BytesIO()
            self._tar = tarfile.open(  # noqa: SIM115 (closed by _flush)
                fileobj=self._buffer, mode="w", format=tarfile.USTAR_FORMAT)
            self._count = 0
        assert self._buffer is not None
        header = self._buffer.tell()
        _tar_member(self._tar, f"{key}.{ext}", image)
        _tar_member(self._tar, f"{key}.cls", str(label).encode())
        self.rows.append((len(self.shards), key, ext, header + tarfile.BLOCKSIZE, len(image),
                          label, zlib.crc32(image)))  # a USTAR header is one block: the data
        self._count += 1
        if self._buffer.tell() >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if self._tar is None:
            return
        assert self._buffer is not None
        self._tar.close()
        data = self._buffer.getvalue()
        name = self._name(len(self.shards))
        self.store.write(join(self.dest, name), data)
        self.shards.append(Shard(name, len(data), self._count))
        self._tar = self._buffer = None

    def close(self) -> ShardIndex:
        """Write the last shard and the index; returns the index."""
        self._flush()
        if not self.rows:
            raise DatasetError(self.dest, None, "nothing to write: the dataset is empty")
        index = _from_rows(self.classes, self.shards, self.rows)
        self.store.write(self.dest + INDEX_SUFFIX, index.to_json())
        return index


def write_shards(dataset: Encodable, store: Store, dest: str, shard_bytes: int,
                 progress: Callable[[int], None] = lambda done: None) -> ShardIndex:
    """``dataset`` as shards ``DEST-000000.tar``, ... of about ``shard_bytes`` and
    ``DEST.index.json``, in the dataset's own order (sample ``i`` of the shards is sample ``i``
    of the dataset). ``progress(samples written)`` runs every 1000 samples."""
    writer = ShardWriter(store, dest, shard_bytes, list(dataset.classes)
                         or [str(c) for c in range(dataset.num_classes)])
    for i in range(len(dataset)):
        image, ext = dataset.encoded(i)
        writer.add(f"{i:09d}", ext, image, dataset.label(i))
        if (i + 1) % 1000 == 0:
            progress(i + 1)
    return writer.close()
