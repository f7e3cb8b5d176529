"""One record per preprocessing: its image size, normalisation, AugMix default and functions.

A job names its preprocessing (``preprocess: cifar | imagenet``); everything that depends on
that choice reads it from the :class:`Preprocessing` here: the worker's training view, the
test-time view used in evaluation, the image side, the mean and std the client normalises
with, the paper's default severity, and which corruption parameter table fits the images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from augserver.transforms import (
    CIFAR_CROP,
    Preprocess,
    Source,
    cifar_eval,
    cifar_train,
    imagenet_eval,
    imagenet_train,
)

SMALL_IMAGE_SIDE = 64
"""Images at most this many pixels a side are CIFAR-like (32 px crops, CIFAR-10-C tables)."""


@dataclass(frozen=True)
class Preprocessing:
    """What a preprocessing name stands for."""

    name: str
    image_size: int
    """Side of the square images it produces unless the job says otherwise (``image_size``)."""
    mean: tuple[float, float, float]
    """Per-channel (RGB) normalisation mean, on pixels scaled to [0, 1]."""
    std: tuple[float, float, float]
    """Per-channel (RGB) normalisation standard deviation, on pixels scaled to [0, 1]."""
    default_severity: int
    """The AugMix paper's severity for this kind of data."""
    train: Preprocess
    """The random training view: ``train(source, rng, size)``, before AugMix."""
    eval: Callable[[Source, int], np.ndarray]
    """The deterministic test-time view: ``eval(source, size)``."""


CIFAR = Preprocessing("cifar", CIFAR_CROP, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 3,
                      cifar_train, cifar_eval)
IMAGENET = Preprocessing("imagenet", 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1,
                         imagenet_train, imagenet_eval)
PREPROCESSINGS: dict[str, Preprocessing] = {p.name: p for p in (CIFAR, IMAGENET)}
NAMES = tuple(PREPROCESSINGS)


def get(name: str) -> Preprocessing:
    """The preprocessing called ``name``; ValueError naming the valid ones otherwise."""
    try:
        return PREPROCESSINGS[name]
    except KeyError:
        raise ValueError(f"unknown preprocessing {name!r}; valid: {', '.join(NAMES)}") from None


def for_images(height: int, width: int) -> Preprocessing:
    """The preprocessing that suits images of this size: CIFAR's for small ones (at most
    :data:`SMALL_IMAGE_SIDE` a side), else ImageNet's."""
    return CIFAR if max(height, width) <= SMALL_IMAGE_SIDE else IMAGENET


def default_for(dataset_format: str) -> Preprocessing:
    """A job's preprocessing when it names none: CIFAR's for the CIFAR formats, else
    ImageNet's."""
    return CIFAR if dataset_format in ("cifar10", "cifar100") else IMAGENET


def preprocess(
    name: str, source: Source, rng: np.random.Generator, size: int | None = None
) -> np.ndarray:
    """Apply the training view of the preprocessing called ``name`` at ``size`` (its own
    image size when None)."""
    record = get(name)
    return record.train(source, rng, record.image_size if size is None else size)
