"""AugmentAndMix (docs/augmix.md): mix chains of random operations with the original image.

All randomness comes from the ``numpy.random.Generator`` passed in; :func:`sample_rng`
derives a sample's generator from ``(seed, epoch, index)`` alone, so a sample's bytes do not
depend on which worker made it or how often it was retried. For each view the generator
draws, in this order: the Dirichlet chain weights and the Beta skip weight of every view,
every chain's depth, then every operation's choice, level and sign. The operations then run
in one compiled kernel call (:func:`augserver._kernels.mix_views`) that mixes in float64
and rounds to nearest uint8 at the end.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from augserver import _kernels
from augserver.augmix_config import AugMixConfig
from augserver.op_names import ALL_OPS
from augserver.ops import check_image, op_params, op_value


class Program(NamedTuple):
    """Every random choice of some AugMix views, ready for the kernel.

    ``codes``/``params`` list each operation of each chain in order (kernel code and the
    six parameters of :func:`augserver.ops.op_params`); ``lengths`` holds the depth of each
    of the ``views * width`` chains; ``weights`` the ``(views, width)`` Dirichlet weights;
    ``skips`` each view's Beta weight ``m``.
    """

    codes: np.ndarray
    params: np.ndarray
    lengths: np.ndarray
    weights: np.ndarray
    skips: np.ndarray


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for sample ``index`` of ``epoch``: a function of these three alone."""
    for name, value in (("seed", seed), ("epoch", epoch), ("index", index)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(f"sample_rng {name} must be a non-negative integer, got {value!r}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, index])))


def augmix_views(
    image: np.ndarray,
    rng: np.random.Generator,
    config: AugMixConfig,
    views: int,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``views`` independent AugMix views of ``image`` as a ``(views, H, W, 3)`` uint8 array.

    ``out``, if given, is filled in place; it may be strided, such as a sample's slot
    ``batch[1:, n]`` in a ``(views, batch, H, W, 3)`` buffer.
    """
    src = check_image(image)
    h, w, _ = src.shape
    if out is None:
        out = np.empty((views, h, w, 3), np.uint8)
    elif out.shape != (views, h, w, 3) or out.dtype != np.uint8 or not out.flags.writeable:
        raise ValueError(
            f"out must be a writable uint8 array of shape {(views, h, w, 3)}, "
            f"got {out.dtype} {out.shape}{'' if out.flags.writeable else ' (read-only)'}"
        )
    rows = out.view()
    try:
        rows.shape = (views, h * w * 3)  # never a copy: the kernel must write into ``out``
    except AttributeError:
        raise ValueError("out: each view must be one C-contiguous block") from None
    _kernels.mix_views(src, *draw_program(rng, config, views, (w, h)), rows)
    return out


def augment_and_mix(
    image: np.ndarray, rng: np.random.Generator, config: AugMixConfig | None = None
) -> np.ndarray:
    """One AugMix view of a uint8 ``(H, W, 3)`` image."""
    return augmix_views(image, rng, config or AugMixConfig(), 1)[0]


def augmix_triple(
    image: np.ndarray, rng: np.random.Generator, config: AugMixConfig | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The JSD training sample ``(orig, aug1, aug2)``: two independent views of ``image``."""
    views = augmix_views(image, rng, config or AugMixConfig(), 2)
    return image, views[0], views[1]


def draw_program(
    rng: np.random.Generator, config: AugMixConfig, views: int, size: tuple[int, int]
) -> Program:
    """Draw every random choice of ``views`` AugMix views of a ``size = (width, height)`` image.

    The order of draws is fixed (see the module docstring), so the program, and therefore
    the pixels, are a function of the generator's state alone.
    """
    width = config.width
    weights = np.empty((views, width))
    skips = np.empty(views)
    for v in range(views):
        weights[v] = rng.dirichlet(config._alphas)
        skips[v] = rng.beta(config.alpha, config.alpha)
    if config.depth > 0:
        lengths = np.full(views * width, config.depth, dtype=np.int64)
    else:
        lengths = rng.integers(1, 4, size=views * width, dtype=np.int64)
    n = int(lengths.sum())
    codes = config._op_codes[rng.integers(0, len(config._op_codes), size=n)]
    levels = rng.uniform(0.1, config.severity, size=n).tolist()
    negates = (rng.random(n) > 0.5).tolist()
    params = np.empty((n, 6))
    for i, code in enumerate(codes.tolist()):
        name = ALL_OPS[code]
        params[i] = op_params(name, op_value(name, levels[i], negates[i], size), size)
    return Program(codes, params, lengths, weights, skips)
