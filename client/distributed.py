"""The torch.distributed world this process is in."""

from __future__ import annotations

import torch.distributed as dist


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: torch.distributed's once it is initialised,
    else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
