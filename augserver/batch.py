"""The layout of one batch on the wire, in the worker, the dispatcher and the loader.

A batch of ``n`` samples is three arrays: ``views`` uint8 ``(V, n, H, W, 3)`` (V = 3 with JSD:
orig, aug1, aug2; else 1), ``labels`` int64 ``(n,)`` and ``indices`` int64 ``(n,)`` (the
dataset index of each sample). The views of one sample are ``views[:, i]``; the samples of one
view are contiguous, so the clean views of a batch are one block, then each AugMix view's.
A batch whose views lie in a shared-memory slot (:mod:`augserver.shm`) sends only the labels
and indices; its views are ``views_shape(n)`` from the slot's start.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

VIEWS_DTYPE = np.dtype(np.uint8)
LABELS_DTYPE = INDICES_DTYPE = np.dtype("<i8")
ARRAYS = 3
"""Arrays per batch: views, labels, indices."""
SAMPLE_OVERHEAD = LABELS_DTYPE.itemsize + INDICES_DTYPE.itemsize
"""Bytes per sample beside its pixels: its label and its index."""


@dataclass(frozen=True)
class BatchLayout:
    """The arrays of a job's batches: ``views`` images of ``side`` x ``side`` per sample."""

    views: int
    side: int

    def views_shape(self, n: int) -> tuple[int, int, int, int, int]:
        return (self.views, n, self.side, self.side, 3)

    @property
    def sample_bytes(self) -> int:
        """Bytes one sample takes in a batch message: its pixels, label and index."""
        return self.views_bytes(1) + SAMPLE_OVERHEAD

    def message_bytes(self, n: int) -> int:
        """Bytes of the arrays of a batch of ``n`` samples (what credits are counted in)."""
        return n * self.sample_bytes

    def empty_views(self, n: int) -> np.ndarray:
        """An uninitialised views array for ``n`` samples, for a worker to fill."""
        return np.empty(self.views_shape(n), VIEWS_DTYPE)

    def views_bytes(self, n: int) -> int:
        """Bytes of the views of ``n`` samples (what a shared-memory slot holds)."""
        return n * self.views * self.side * self.side * 3

    def problem(self, specs: list[tuple[np.dtype, tuple[int, ...]]],
                in_slot: bool = False) -> str | None:
        """What is wrong with a batch's ``(dtype, shape)`` array specs, or None; ``in_slot``:
        the views are in a shared-memory slot, so only the labels and indices are sent."""
        if in_slot:
            if len(specs) != ARRAYS - 1:
                return f"{len(specs)} arrays instead of 2 (labels, indices; views in a slot)"
            specs = [(VIEWS_DTYPE, self.views_shape(specs[1][1][0] if specs[1][1] else 0)),
                     *specs]
        if len(specs) != ARRAYS:
            return f"{len(specs)} arrays instead of {ARRAYS} (views, labels, indices)"
        (views, shape), (labels, n_labels), (indices, n_indices) = specs
        if indices != INDICES_DTYPE or len(n_indices) != 1:
            return f"indices are {indices}{list(n_indices)}, expected int64[n]"
        n = n_indices[0]
        if labels != LABELS_DTYPE or n_labels != (n,):
            return f"labels are {labels}{list(n_labels)}, expected int64[{n}]"
        expected = self.views_shape(n)
        if views != VIEWS_DTYPE or shape != expected:
            return f"views are {views}{list(shape)}, expected uint8{list(expected)}"
        return None
