"""Training-side client for augserver: the remote loader and the AugMix JSD loss."""

from .loader import AugMixBatch, RemoteAugMixLoader, RemoteError
from .loss import jsd_loss, jsd_loss_from_concat, split_views

__all__ = [
    "AugMixBatch",
    "RemoteAugMixLoader",
    "RemoteError",
    "jsd_loss",
    "jsd_loss_from_concat",
    "split_views",
]
