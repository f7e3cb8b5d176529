"""Whole corrupted test sets, made once and kept on disk, encoded.

:func:`iter_corrupted` yields every ``(name, severity)`` set of a batch of images; each is
made with :func:`client.robustness.corruptions.corrupt_images` and saved as
``cache_dir/<fingerprint>/<name>-<severity>.zip``, where the fingerprint hashes the images
(bytes and shape), the seed, the table and :data:`VERSION`. Bump ``VERSION`` whenever a
corruption's formula or the file format changes.

A set is a zip (stored, not deflated again) of one PNG per image, ``00000000.png``, ... PNG
and not JPEG (ImageNet-C's choice, at quality 85): PNG is lossless, so an evaluation gives the
same numbers whether a set came from the cache or was just made, while JPEG would add its own
artefacts on top of each corruption. Encoded, a set takes a fraction of the raw uint8 bytes
(see :func:`save_set`); only one set is in memory at a time.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from augserver.files import atomic_write
from client.robustness.corruptions import (
    check_images,
    check_name,
    check_params,
    check_severity,
    corrupt_images,
)
from client.robustness.tables import CORRUPTIONS, SEVERITIES

VERSION = 2


def fingerprint(images: np.ndarray, seed: int = 0, params: str | None = None) -> str:
    """Hex digest naming a cache directory: the images' bytes and shape, seed, table, VERSION."""
    images = check_images(images)
    params = check_params(params, images.shape[1], images.shape[2])
    h = hashlib.sha256()
    h.update(f"augserver-corruptions v{VERSION} {params} seed={seed} {images.shape}".encode())
    h.update(memoryview(np.ascontiguousarray(images)).cast("B"))
    return h.hexdigest()[:24]


def cache_path(
    images: np.ndarray,
    cache_dir: str | os.PathLike,
    name: str,
    severity: int,
    *,
    seed: int = 0,
    params: str | None = None,
) -> Path:
    """Where :func:`iter_corrupted` keeps the set ``(name, severity)`` of ``images``."""
    return Path(cache_dir) / fingerprint(images, seed, params) / f"{name}-{severity}.zip"


PNG_LEVEL = 6
"""zlib level of the PNGs: zlib's default; higher levels save little on noisy images."""


def save_set(path: str | os.PathLike, images: np.ndarray) -> None:
    """Write ``images`` (N x H x W x 3 uint8) as a zip of PNGs, atomically."""
    def write(f: BinaryIO) -> None:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as archive:
            for i, image in enumerate(images):
                out = io.BytesIO()
                Image.fromarray(image).save(out, format="PNG", compress_level=PNG_LEVEL)
                archive.writestr(f"{i:08d}.png", out.getvalue())

    atomic_write(path, write)


def load_set(path: str | os.PathLike, shape: tuple[int, ...]) -> np.ndarray | None:
    """The set at ``path`` if it is complete and of ``shape``, else None (missing,
    unreadable, truncated or mis-shaped: it is then made again)."""
    out = np.empty(shape, np.uint8)
    try:
        with zipfile.ZipFile(path) as archive:
            names = sorted(archive.namelist())
            if names != [f"{i:08d}.png" for i in range(shape[0])]:
                return None
            for i, name in enumerate(names):
                with Image.open(io.BytesIO(archive.read(name)), formats=["PNG"]) as img:
                    pixels = np.asarray(img.convert("RGB"))
                if pixels.shape != shape[1:]:
                    return None
                out[i] = pixels
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError):
        return None
    return out


def _load_or_make(
    images: np.ndarray, directory: Path, name: str, severity: int, seed: int, params: str
) -> tuple[np.ndarray, bool]:
    """(the set, whether it came from the cache)."""
    path = directory / f"{name}-{severity}.zip"
    cached = load_set(path, images.shape)
    if cached is not None:
        return cached, True
    made = corrupt_images(images, name, severity, seed, params)
    save_set(path, made)
    return made, False


def check_selection(
    names: Iterable[str], severities: Iterable[int]
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    if isinstance(names, str):
        names = (names,)
    names = tuple(check_name(n) for n in names)
    severities = tuple(check_severity(s) for s in severities)
    if not names:
        raise ValueError("names must name at least one corruption")
    if not severities:
        raise ValueError("severities must hold at least one severity")
    return names, severities


def _prepare_cache(
    images: np.ndarray, cache_dir: str | os.PathLike, seed: int, params: str | None
) -> tuple[Path, str]:
    params = check_params(params, images.shape[1], images.shape[2])
    directory = Path(cache_dir) / fingerprint(images, seed, params)
    meta = directory / "meta.json"
    if not meta.exists():
        info = {
            "version": VERSION,
            "params": params,
            "seed": seed,
            "shape": list(images.shape),
            "files": "<name>-<severity>.zip: one PNG per image, 00000000.png, ...",
        }
        atomic_write(meta, lambda f: f.write(json.dumps(info, indent=1).encode() + b"\n"))
    return directory, params


def iter_sets(
    images: np.ndarray,
    cache_dir: str | os.PathLike | None,
    seed: int,
    names: Iterable[str],
    severities: Iterable[int],
    params: str | None,
) -> Iterator[tuple[str, int, np.ndarray, bool]]:
    """``(name, severity, set, from the cache)`` for each set; with ``cache_dir`` None the
    sets are made and nothing is written (streamed: one set in memory, no disk)."""
    images = check_images(images)
    names, severities = check_selection(names, severities)
    if cache_dir is None:
        params = check_params(params, images.shape[1], images.shape[2])
        return ((name, severity, corrupt_images(images, name, severity, seed, params), False)
                for name in names for severity in severities)
    directory, params = _prepare_cache(images, cache_dir, seed, params)

    def generate() -> Iterator[tuple[str, int, np.ndarray, bool]]:
        for name in names:
            for severity in severities:
                arr, hit = _load_or_make(images, directory, name, severity, seed, params)
                yield name, severity, arr, hit

    return generate()


def iter_corrupted(
    images: np.ndarray,
    cache_dir: str | os.PathLike | None,
    *,
    seed: int = 0,
    names: Iterable[str] = CORRUPTIONS,
    severities: Iterable[int] = SEVERITIES,
    params: str | None = None,
) -> Iterator[tuple[str, int, np.ndarray]]:
    """Yield ``(name, severity, corrupted NHWC uint8)`` for every name x severity, in order.

    Each set is made with :func:`corrupt_images` and saved atomically as
    ``cache_dir/<fingerprint>/<name>-<severity>.zip`` (:func:`save_set`); a later call loads
    it instead of recomputing. A cache file that cannot be loaded or has the wrong shape is
    made again. Arguments are checked before the first set is made.
    """
    sets = iter_sets(images, cache_dir, seed, names, severities, params)
    return ((name, severity, arr) for name, severity, arr, _ in sets)
