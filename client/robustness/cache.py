"""Whole corrupted test sets, made once and kept on disk.

:func:`iter_corrupted` yields every ``(name, severity)`` set of a batch of images; each is
made with :func:`client.robustness.corruptions.corrupt_images` and saved as
``cache_dir/<fingerprint>/<name>-<severity>.npy``, where the fingerprint hashes the images
(bytes and shape), the seed, the table and :data:`VERSION`. Bump ``VERSION`` whenever a
corruption's formula changes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from augserver.files import atomic_write
from client.robustness.corruptions import (
    check_images,
    check_name,
    check_params,
    check_severity,
    corrupt_images,
)
from client.robustness.tables import CORRUPTIONS, SEVERITIES

VERSION = 1


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
    return Path(cache_dir) / fingerprint(images, seed, params) / f"{name}-{severity}.npy"


def _load_cached(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The cached set at ``path``, or None when missing, unreadable, truncated or mis-shaped."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):  # missing, unreadable, truncated, not an .npy
        return None
    if arr.dtype != np.uint8 or arr.shape != shape:
        return None
    return arr


def _load_or_make(
    images: np.ndarray, directory: Path, name: str, severity: int, seed: int, params: str
) -> tuple[np.ndarray, bool]:
    """(the set, whether it came from the cache)."""
    path = directory / f"{name}-{severity}.npy"
    cached = _load_cached(path, images.shape)
    if cached is not None:
        return cached, True
    made = corrupt_images(images, name, severity, seed, params)
    atomic_write(path, lambda f: np.save(f, made, allow_pickle=False))
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
            "files": "<name>-<severity>.npy, uint8 N x H x W x 3",
        }
        atomic_write(meta, lambda f: f.write(json.dumps(info, indent=1).encode() + b"\n"))
    return directory, params


def iter_sets(
    images: np.ndarray,
    cache_dir: str | os.PathLike,
    seed: int,
    names: Iterable[str],
    severities: Iterable[int],
    params: str | None,
) -> Iterator[tuple[str, int, np.ndarray, bool]]:
    images = check_images(images)
    names, severities = check_selection(names, severities)
    directory, params = _prepare_cache(images, cache_dir, seed, params)

    def generate() -> Iterator[tuple[str, int, np.ndarray, bool]]:
        for name in names:
            for severity in severities:
                arr, hit = _load_or_make(images, directory, name, severity, seed, params)
                yield name, severity, arr, hit

    return generate()


def iter_corrupted(
    images: np.ndarray,
    cache_dir: str | os.PathLike,
    *,
    seed: int = 0,
    names: Iterable[str] = CORRUPTIONS,
    severities: Iterable[int] = SEVERITIES,
    params: str | None = None,
) -> Iterator[tuple[str, int, np.ndarray]]:
    """Yield ``(name, severity, corrupted NHWC uint8)`` for every name x severity, in order.

    Each set is made with :func:`corrupt_images` and saved atomically as
    ``cache_dir/<fingerprint>/<name>-<severity>.npy``; a later call loads it instead of
    recomputing. A cache file that cannot be loaded or has the wrong shape is made again.
    Arguments are checked before the first set is made.
    """
    sets = iter_sets(images, cache_dir, seed, names, severities, params)
    return ((name, severity, arr) for name, severity, arr, _ in sets)
