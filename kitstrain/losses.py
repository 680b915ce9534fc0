"""Segmentation losses: cross-entropy, soft Dice, and their sum.

Cross-entropy alone lets a model sit at ~99 % accuracy by predicting background (the
kidney is about 1 % of a KiTS19 volume); the soft Dice term is computed over foreground
classes only, so it cannot be satisfied that way.

Every loss computes in float32 even under ``torch.autocast``: the sums over a whole batch
of 512x512 slices lose too much precision in half types.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LOSSES", "ce_dice_loss", "cross_entropy_loss", "make_loss", "soft_dice_loss"]


def _check(logits: Tensor, target: Tensor, num_classes: int) -> None:
    # Shape and dtype checks only: checking label values would force a device sync per step.
    if logits.dim() != 4 or logits.shape[1] != num_classes:
        raise ValueError(
            f"loss: expected logits of shape (N, {num_classes}, H, W); found "
            f"{tuple(logits.shape)}. Fix: build the model with num_classes={num_classes}."
        )
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"loss: expected target of shape {expected} (N, H, W); found {tuple(target.shape)}."
            f" Fix: pass class indices, not one-hot, without a channel dimension."
        )
    if target.dtype != torch.int64:
        raise ValueError(
            f"loss: expected an int64 target of class indices; found {target.dtype}. "
            f"Fix: target.long()."
        )


def _no_autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device_type=device.type, enabled=False)


def soft_dice_loss(
    logits: Tensor, target: Tensor, num_classes: int, smooth: float = 1e-5
) -> Tensor:
    """1 - mean soft Dice over foreground classes, as nnU-Net's "batch dice".

    Softmax probabilities and one-hot targets are summed over the whole batch (not per
    image) before the ratio, so slices without kidney neither dominate nor divide by zero.
    A class absent from both target and prediction scores ~1 thanks to ``smooth``.
    """
    _check(logits, target, num_classes)
    if num_classes < 2:
        raise ValueError(
            f"soft_dice_loss: expected num_classes >= 2 (background plus foreground); found "
            f"{num_classes}. Fix: use cross-entropy alone or add a background class."
        )
    with _no_autocast(logits.device):
        probs = torch.softmax(logits.float(), dim=1)[:, 1:]
        onehot = F.one_hot(target, num_classes).permute(0, 3, 1, 2)[:, 1:].to(probs.dtype)
        dims = (0, 2, 3)
        inter = (probs * onehot).sum(dims)
        denom = probs.sum(dims) + onehot.sum(dims)
        dice = (2.0 * inter + smooth) / (denom + smooth).clamp_min(1e-8)
        return 1.0 - dice.mean()


def cross_entropy_loss(logits: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Mean pixel-wise cross-entropy, in float32."""
    _check(logits, target, num_classes)
    with _no_autocast(logits.device):
        return F.cross_entropy(logits.float(), target)


def ce_dice_loss(
    logits: Tensor, target: Tensor, num_classes: int, dice_weight: float = 1.0
) -> Tensor:
    """Cross-entropy plus ``dice_weight`` times the soft Dice loss (nnU-Net's default)."""
    ce = cross_entropy_loss(logits, target, num_classes)
    return ce + dice_weight * soft_dice_loss(logits, target, num_classes)


LOSSES: dict[str, Callable[..., Tensor]] = {
    "ce": cross_entropy_loss,
    "ce+dice": ce_dice_loss,
}


def make_loss(name: str, num_classes: int) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss called ``name`` as ``loss(logits, target)``, with ``num_classes`` bound."""
    if name not in LOSSES:
        raise ValueError(
            f"unknown loss: expected one of {', '.join(repr(k) for k in LOSSES)}; found "
            f"{name!r}. Fix: choose one of those names."
        )
    return partial(LOSSES[name], num_classes=num_classes)
