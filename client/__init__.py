"""Training-side client for augserver."""

from .loss import jsd_loss, jsd_loss_from_concat, split_views

__all__ = ["jsd_loss", "jsd_loss_from_concat", "split_views"]
