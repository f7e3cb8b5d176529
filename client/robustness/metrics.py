"""The robustness metrics the AugMix paper reports: error, calibration, AlexNet's baseline.

All errors are fractions in [0, 1]. :func:`client.robustness.evaluation.evaluate` combines them
over the clean and the corrupted test sets.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from client.robustness.tables import CORRUPTIONS, SEVERITIES

# AlexNet's ImageNet-C top-1 error per corruption, averaged over the five severities.
ALEXNET_MEAN_ERRORS: dict[str, float] = dict(
    zip(
        CORRUPTIONS,
        (0.886428, 0.894468, 0.922640, 0.819880, 0.826268, 0.785948, 0.798360, 0.866816,
         0.826572, 0.819324, 0.564592, 0.853204, 0.646056, 0.717840, 0.606500),
        strict=True,
    )
)  # fmt: skip


def alexnet_baseline() -> dict[str, list[float]]:
    """An ImageNet-C ``baseline`` for :func:`evaluate` from :data:`ALEXNET_MEAN_ERRORS`.

    Only per-corruption means are published, so each severity gets the mean; the normalised
    mCE only uses the sum over severities, which this keeps exact (for all five severities).
    """
    return {name: [err] * len(SEVERITIES) for name, err in ALEXNET_MEAN_ERRORS.items()}


def rms_calibration_error(confidence: np.ndarray, correct: np.ndarray, beta: int = 100) -> float:
    """RMS calibration error with adaptive bins, as ``calib_err(confidence, correct, p='2',
    beta)`` in the Hendrycks et al. calibration tools used for the AugMix paper.

    Samples are sorted by confidence and cut into bins of ``beta`` consecutive samples, the last
    bin absorbing the remainder (fewer than ``beta`` samples make one bin). The result is
    ``sqrt(sum_b |b| / N * (mean confidence in b - accuracy in b) ** 2)``.

    One deliberate difference: the reference loop runs over ``range(len(bins) - 1)``, which
    leaves the last (most confident) bin out of the sum while still dividing by all N, and
    fails on fewer than ``beta`` samples. Here every bin counts, so perfectly calibrated
    predictions give 0 and confidently wrong ones give 1.
    """
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    corr = np.asarray(correct, dtype=np.float64).ravel()
    if conf.shape != corr.shape:
        raise ValueError(
            f"confidence and correct must have the same length, got {conf.size} and {corr.size}"
        )
    if conf.size == 0:
        raise ValueError("rms_calibration_error needs at least one sample")
    if isinstance(beta, bool) or not isinstance(beta, int | np.integer) or beta < 1:
        raise ValueError(f"beta must be a positive integer, got {beta!r}")
    order = np.argsort(conf, kind="stable")
    conf, corr = conf[order], corr[order]
    n = conf.size
    edges = [i * beta for i in range(max(1, n // beta))] + [n]
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        gap = conf[lo:hi].mean() - corr[lo:hi].mean()
        total += (hi - lo) / n * gap * gap
    return math.sqrt(total)


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1 ``error`` and ``rms_calibration_error`` of softmax ``probs`` against ``labels``."""
    correct = probs.argmax(axis=1) == labels
    return {
        "error": float(1.0 - correct.mean()),
        "rms_calibration_error": rms_calibration_error(probs.max(axis=1), correct),
    }
