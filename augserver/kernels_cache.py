"""The compiled AugMix kernels: loading them, compiling them once, and where numba keeps them.

numba compiles the kernels of :mod:`augserver._kernels` on first use (several seconds on two
cores) and caches the machine code on disk: in the package's ``__pycache__`` folder, in numba's
user-wide cache folder when the package folder is read-only, or in ``NUMBA_CACHE_DIR`` when that
is set. :func:`load_kernels` runs every kernel a worker needs once, so that afterwards nothing
compiles, and says whether it compiled or loaded them, where and in how long.

``augserver warm-up`` (run by ``scripts/setup.sh`` and the container image) fills the cache
ahead of time. ``augserver serve --workers N`` and ``augserver worker --procs N`` check it
(:func:`is_warm`) before they start their worker processes and, when it is not complete,
compile the kernels once themselves first, so that the workers load them from the cache
instead of compiling them side by side.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

NUMBA_HINT = "point NUMBA_CACHE_DIR at a writable folder to keep the compiled kernels"


@dataclass(frozen=True)
class KernelLoad:
    """What :func:`load_kernels` did."""

    seconds: float
    compiled: bool
    """True when something was compiled (the cache lacked it); False: all came from the cache."""
    cache_dir: str | None
    """Where numba keeps the kernels (None: it found nowhere to write)."""
    problems: list[str] = field(default_factory=list)
    """What numba said about caching (a cache it could not write, say)."""

    def describe(self) -> str:
        """One line for the log."""
        where = self.cache_dir or "nowhere (not cached)"
        verb = "compiled" if self.compiled else "loaded from the cache"
        line = f"AugMix kernels {verb} in {self.seconds:.1f} s; cache: {where}"
        if self.problems or self.cache_dir is None:
            line += f" ({'; '.join(self.problems) or 'numba cannot cache them'}; {NUMBA_HINT})"
        return line


def cache_dir() -> str | None:
    """The folder numba caches the kernels in, or None when it has none."""
    from augserver import _kernels

    return getattr(getattr(_kernels.mix_views, "_cache", None), "_cache_path", None)


def is_warm() -> bool:
    """Whether numba's cache holds every kernel already, compiled for this CPU (numba keys its
    cache by CPU model and features), so that worker processes can load them at once; False
    when in doubt."""
    from numba.core.registry import CPUDispatcher

    from augserver import _kernels

    kernels = [k for k in vars(_kernels).values() if isinstance(k, CPUDispatcher)]
    try:
        this_cpu = kernels[0].targetctx.codegen().magic_tuple()
        # an index maps (signature, CPU, code stamps) to a cached object file
        return all(any(key[1] == this_cpu for key in k._cache._cache_file._load_index())
                   for k in kernels)
    except Exception:  # no kernel, or another numba's internals: assume cold, load first
        return False


def _cached_files(folder: str | None) -> set[str]:
    if folder is None or not Path(folder).is_dir():
        return set()
    return {p.name for p in Path(folder).glob("_kernels.*.nbi")}


def load_kernels() -> KernelLoad:
    """Load (or compile and cache) every kernel a worker runs: each operation at both image
    layouts and the strided batch-slot variant of the mix. About 0.5 s from the cache."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            folder = cache_dir()
        except RuntimeError as exc:  # numba: no locator can write anywhere
            raise RuntimeError(f"cannot cache the AugMix kernels: {exc}; {NUMBA_HINT}") from None
        before = _cached_files(folder)
        _run_every_kernel()
    problems = sorted({str(w.message).splitlines()[0] for w in caught
                       if "cach" in str(w.message).lower()})
    return KernelLoad(time.perf_counter() - start, _cached_files(folder) != before, folder,
                      problems)


def _run_every_kernel() -> None:
    from augserver.augmix import augmix_views, sample_rng
    from augserver.augmix_config import AugMixConfig
    from augserver.preprocessing import preprocess

    rng = sample_rng(0, 0, 0)
    config = AugMixConfig(severity=10, all_ops=True)
    for name, side in (("cifar", 32), ("imagenet", 64)):
        image = preprocess(name, np.zeros((side, side, 3), np.uint8), rng)
        augmix_views(image, rng, config, 2)
        batch = np.empty((3, 2, *image.shape), np.uint8)  # a strided slot, as make_batch fills
        augmix_views(image, rng, config, 2, out=batch[1:, 0])
