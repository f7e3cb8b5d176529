"""AugmentAndMix (AUGMIX.md): mix chains of random operations with the original image.

All randomness comes from the ``numpy.random.Generator`` passed in; :func:`sample_rng`
derives a sample's generator from ``(seed, epoch, index)`` alone, so a sample's bytes do not
depend on which worker made it or how often it was retried. For each view the generator
draws, in this order: the Dirichlet chain weights and the Beta skip weight of every view,
every chain's depth, then every operation's choice, level and sign. The operations then run
in one compiled kernel call (:func:`augserver._kernels.mix_views`) that mixes in float64
and rounds to nearest uint8 at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np

from augserver import _kernels
from augserver.ops import ALL_OPS, OP_CODES, OPS, check_image, op_params, op_value


@dataclass(frozen=True)
class AugMixConfig:
    """AugMix parameters: the paper's defaults are severity 3 (CIFAR) or 1 (ImageNet).

    ``depth=-1`` draws each chain's depth uniformly from 1..3. ``all_ops`` adds the four
    operations that overlap ImageNet-C.
    """

    severity: int = 3
    width: int = 3
    depth: int = -1
    alpha: float = 1.0
    all_ops: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.severity, bool) or not isinstance(self.severity, int | float):
            raise TypeError(f"augmix severity must be a number, got {self.severity!r}")
        if not 1 <= self.severity <= 10:
            raise ValueError(f"augmix severity must be in 1..10, got {self.severity!r}")
        if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"augmix width must be an integer >= 1, got {self.width!r}")
        if (
            isinstance(self.depth, bool)
            or not isinstance(self.depth, int)
            or self.depth == 0
            or self.depth < -1
        ):
            raise ValueError(
                f"augmix depth must be -1 (random 1..3) or an integer >= 1, got {self.depth!r}"
            )
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float):
            raise TypeError(f"augmix alpha must be a number, got {self.alpha!r}")
        if not self.alpha > 0:
            raise ValueError(f"augmix alpha must be > 0, got {self.alpha!r}")
        if not isinstance(self.all_ops, bool):
            raise TypeError(f"augmix all_ops must be true or false, got {self.all_ops!r}")

    @property
    def op_names(self) -> tuple[str, ...]:
        """The operation set the chains draw from."""
        return ALL_OPS if self.all_ops else OPS

    @cached_property
    def _op_codes(self) -> np.ndarray:
        return np.array([OP_CODES[name] for name in self.op_names], dtype=np.int64)

    @cached_property
    def _alphas(self) -> np.ndarray:
        return np.full(self.width, float(self.alpha))


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
