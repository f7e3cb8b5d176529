"""AugMix Jensen-Shannon consistency loss (training side, torch).

Follows the authors' reference (docs/augmix.md, "The Jensen-Shannon consistency loss"):

    p_c, p_1, p_2 = softmax(logits_clean), softmax(logits_aug1), softmax(logits_aug2)
    log_M = log(clamp((p_c + p_1 + p_2) / 3, 1e-7, 1))
    JS = (KL(p_c || M) + KL(p_1 || M) + KL(p_2 || M)) / 3      # each KL batch-averaged
    loss = cross_entropy(logits_clean, targets) + lam * JS
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["jsd_loss", "jsd_loss_from_concat", "split_views"]

_LOGITS_NAMES = ("logits_clean", "logits_aug1", "logits_aug2")


def _check_inputs(
    logits: tuple[torch.Tensor, torch.Tensor, torch.Tensor], targets: torch.Tensor, lam: float,
    smoothing: float = 0.0,
) -> None:
    clean = logits[0]
    for name, t in zip(_LOGITS_NAMES, logits, strict=True):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 2:
            raise ValueError(f"{name} must be 2-D (batch, classes), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.shape != clean.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but logits_clean has shape "
                f"{tuple(clean.shape)}; the three views must have the same shape"
            )
    if clean.shape[0] == 0:
        raise ValueError("logits_clean has an empty batch (0 rows)")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.ndim not in (1, 2) or targets.shape[0] != clean.shape[0]:
        raise ValueError(
            f"targets has shape {tuple(targets.shape)} but logits_clean has batch size "
            f"{clean.shape[0]}; expected ({clean.shape[0]},) class indices "
            f"or ({clean.shape[0]}, {clean.shape[1]}) class probabilities"
        )
    if not lam >= 0:  # also rejects NaN
        raise ValueError(f"lam must be a non-negative number, got {lam!r}")
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")


def jsd_loss(
    logits_clean: torch.Tensor,
    logits_aug1: torch.Tensor,
    logits_aug2: torch.Tensor,
    targets: torch.Tensor,
    lam: float = 12.0,
    smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy on the clean view plus ``lam`` times the Jensen-Shannon consistency term.

    ``smoothing`` > 0 smooths the clean view's labels as timm's ``JsdCrossEntropy`` does
    (``F.cross_entropy(..., label_smoothing=smoothing)``); the default 0 is the paper's loss.

    Logits are ``(B, C)``; ``targets`` are ``(B,)`` class indices (or ``(B, C)`` probabilities,
    as accepted by ``F.cross_entropy``). Returns a scalar tensor.

    Each KL term is ``F.kl_div(log_M, p, reduction='batchmean')`` as in the reference, but
    ``p`` is passed as a log-probability (``log_target=True``, from ``log_softmax``): the value
    is the same, and the gradient stays finite when a softmax probability underflows to 0
    (the reference form takes ``log(0)`` in the backward pass and yields NaN gradients).
    """
    views = (logits_clean, logits_aug1, logits_aug2)
    _check_inputs(views, targets, lam, smoothing)
    p_c, p_1, p_2 = (F.softmax(v, dim=1) for v in views)
    log_p_c, log_p_1, log_p_2 = (F.log_softmax(v, dim=1) for v in views)
    log_m = torch.clamp((p_c + p_1 + p_2) / 3.0, 1e-7, 1).log()
    js = (
        F.kl_div(log_m, log_p_c, reduction="batchmean", log_target=True)
        + F.kl_div(log_m, log_p_1, reduction="batchmean", log_target=True)
        + F.kl_div(log_m, log_p_2, reduction="batchmean", log_target=True)
    ) / 3.0
    return F.cross_entropy(logits_clean, targets, label_smoothing=smoothing) + lam * js


def split_views(logits: torch.Tensor, n_views: int = 3) -> tuple[torch.Tensor, ...]:
    """Split logits of the concatenated ``n_views * B`` batch into ``n_views`` tensors of ``B``.

    The batch is ordered view-major: all clean rows, then all aug1 rows, then all aug2 rows.
    """
    if isinstance(n_views, bool) or not isinstance(n_views, int) or n_views < 1:
        raise ValueError(f"n_views must be a positive int, got {n_views!r}")
    if not isinstance(logits, torch.Tensor) or logits.ndim < 1:
        raise ValueError("logits must be a torch.Tensor with at least one dimension")
    total = logits.shape[0]
    if total % n_views:
        raise ValueError(
            f"logits has {total} rows in its first dimension, not divisible by n_views={n_views}"
        )
    return tuple(torch.split(logits, total // n_views)) if total else (logits,) * n_views


def jsd_loss_from_concat(
    logits_all: torch.Tensor, targets: torch.Tensor, lam: float = 12.0, smoothing: float = 0.0
) -> torch.Tensor:
    """``jsd_loss`` on the logits of the concatenated ``3B`` batch (clean, aug1, aug2), the
    layout of ``loader(as_tuples=True)`` and of timm's ``JsdCrossEntropy(num_splits=3)``.
    ``targets``: the ``B`` labels, or the ``3B`` of timm's layout (as timm's loss does, the
    first ``B``, the clean view's, are used)."""
    views = split_views(logits_all, 3)
    if len(targets) == len(logits_all) and len(views[0]) != len(logits_all):
        targets = targets[: len(views[0])]
    return jsd_loss(*views, targets, lam=lam, smoothing=smoothing)
