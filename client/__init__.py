"""Training-side client for augserver: the remote loader, the AugMix JSD loss, checkpoints.

This package is the library a training job imports. The example programs that use it live in
:mod:`client.programs`, the robustness toolkit (corruptions, metrics) in
:mod:`client.robustness`.
"""

from augserver.errors import RemoteError

from .checkpoint import load_checkpoint, save_checkpoint
from .loader import AugMixBatch, RemoteAugMixLoader
from .loss import jsd_loss, jsd_loss_from_concat, split_views

__all__ = [
    "AugMixBatch",
    "RemoteAugMixLoader",
    "RemoteError",
    "jsd_loss",
    "jsd_loss_from_concat",
    "load_checkpoint",
    "save_checkpoint",
    "split_views",
]
