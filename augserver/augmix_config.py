"""The AugMix parameters of a job: validated on construction, light to import (no kernels).

Each invalid value raises :class:`~augserver.errors.ConfigError` whose ``key`` is the job
file's dotted key (``augmix.severity``), so the configuration reports it as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, NoReturn

import numpy as np

from augserver.errors import ConfigError
from augserver.op_names import ALL_OPS, OP_CODES, OPS


def _fail(name: str, problem: str) -> NoReturn:
    raise ConfigError(f"augmix.{name}: {problem}", None, f"augmix.{name}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
        if not _is_number(self.severity):
            _fail("severity", f"must be a number, got {self.severity!r}")
        if not 1 <= self.severity <= 10:
            _fail("severity", f"must be in 1..10, got {self.severity!r}")
        if not _is_int(self.width) or self.width < 1:
            _fail("width", f"must be an integer >= 1, got {self.width!r}")
        if not _is_int(self.depth) or self.depth == 0 or self.depth < -1:
            _fail("depth", f"must be -1 (random 1..3) or an integer >= 1, got {self.depth!r}")
        if not _is_number(self.alpha):
            _fail("alpha", f"must be a number, got {self.alpha!r}")
        if not self.alpha > 0:
            _fail("alpha", f"must be > 0, got {self.alpha!r}")
        if not isinstance(self.all_ops, bool):
            _fail("all_ops", f"must be true or false, got {self.all_ops!r}")

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
