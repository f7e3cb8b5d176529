"""Checkpoint files: written whole or not at all, read back with ``weights_only=True``.

A checkpoint is one ``torch.save`` dict of plain types and tensors (what the example trainer
keeps is listed in :mod:`client.programs.train`), so loading it never runs code from the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from augserver.files import atomic_write


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``state`` to ``path`` atomically (see :func:`augserver.files.atomic_write`)."""
    atomic_write(path, lambda f: torch.save(dict(state), f))


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint` (plain types and tensors only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    """torch's CPU and (when used) CUDA generator states, for a checkpoint."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
