"""Segmentation losses: cross-entropy, soft Dice, and their sum, over classes (softmax) or
over the edition's scored regions (sigmoid, nnU-Net's region-based training).

Cross-entropy alone lets a model sit at ~99 % accuracy by predicting background (the
kidney is about 1 % of a KiTS19 volume); the soft Dice term is computed over foreground
classes only, so it cannot be satisfied that way.

Every loss computes in float32 even under ``torch.autocast``: the sums over a whole batch
of 512x512 slices lose too much precision in half types.

Every loss exists in both forms, so `LOSSES` holds one `Loss` per name with the two
functions side by side: a name cannot be valid for one form and a KeyError in the other.
The region form's targets come from the label set's own membership table
(`LabelSet.region_table`), never from a second copy of the label -> region mapping.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from kitsprep.labels import LabelSet

__all__ = [
    "LOSSES",
    "Loss",
    "bce_dice_region_loss",
    "bce_region_loss",
    "ce_dice_loss",
    "cross_entropy_loss",
    "deep_supervision_loss",
    "deep_supervision_weights",
    "make_loss",
    "region_lut",
    "region_targets",
    "soft_dice_loss",
    "soft_dice_region_loss",
]


def _check(logits: Tensor, target: Tensor, channels: int, regions: bool = False) -> None:
    # Shape and dtype checks only: checking label values would force a device sync per step.
    if logits.dim() != 4 or logits.shape[1] != channels:
        what = f"{channels} region logits" if regions else f"{channels} class logits"
        fix = (
            f"one region logit per region of the label set (regions=True, region_writes "
            f"= the label set's write_order, of length {channels})"
            if regions
            else f"num_classes={channels}"
        )
        raise ValueError(
            f"loss: expected {what}, shape (N, {channels}, H, W); found "
            f"{tuple(logits.shape)}. Fix: build the model with {fix}."
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
        return _batch_dice_loss(probs, onehot, smooth)


def _batch_dice_loss(probs: Tensor, truth: Tensor, smooth: float) -> Tensor:
    """1 - mean over channels of the soft Dice summed over batch and pixels."""
    dims = (0, 2, 3)
    inter = (probs * truth).sum(dims)
    denom = probs.sum(dims) + truth.sum(dims)
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


def region_lut(labels: LabelSet) -> Tensor:
    """bool (values, regions): the label set's `region_table` as a tensor. Indexing it with
    a label tensor gives the region targets in one gather, on any device."""
    return torch.from_numpy(labels.region_table())


def region_targets(target: Tensor, lut: Tensor) -> Tensor:
    """float (N, regions, H, W): channel k is 1 where the label belongs to region k (the
    torch twin of `kitsprep.labels.region_masks`; ``lut`` from `region_lut`, best already
    on the target's device)."""
    return lut.to(target.device)[target].permute(0, 3, 1, 2).float()


def bce_region_loss(logits: Tensor, target: Tensor, lut: Tensor) -> Tensor:
    """Mean binary cross-entropy of each region's sigmoid logit, in float32."""
    _check(logits, target, lut.shape[1], regions=True)
    with _no_autocast(logits.device):
        return F.binary_cross_entropy_with_logits(logits.float(), region_targets(target, lut))


def soft_dice_region_loss(
    logits: Tensor, target: Tensor, lut: Tensor, smooth: float = 1e-5
) -> Tensor:
    """1 - mean batch soft Dice of the sigmoid regions (as `soft_dice_loss` for classes)."""
    _check(logits, target, lut.shape[1], regions=True)
    with _no_autocast(logits.device):
        probs = torch.sigmoid(logits.float())
        return _batch_dice_loss(probs, region_targets(target, lut), smooth)


def bce_dice_region_loss(logits: Tensor, target: Tensor, lut: Tensor) -> Tensor:
    """Binary cross-entropy plus soft Dice over regions (nnU-Net's DC_and_BCE_loss)."""
    return bce_region_loss(logits, target, lut) + soft_dice_region_loss(logits, target, lut)


@dataclass(frozen=True)
class Loss:
    """One loss in its two forms: over classes, ``classes(logits, target, num_classes)``
    (softmax), and over the label set's scored regions, ``regions(logits, target, lut)``
    (a sigmoid per region, ``lut`` from `region_lut`). `bind` gives either as
    ``loss(logits, target)``."""

    classes: Callable[..., Tensor]
    regions: Callable[..., Tensor]

    def bind(self, labels: LabelSet, regions: bool) -> Callable[[Tensor, Tensor], Tensor]:
        """``loss(logits, target)`` over the classes of ``labels`` or over its regions."""
        if not regions:
            return partial(self.classes, num_classes=labels.num_classes)
        region_loss, lut = self.regions, region_lut(labels)
        luts: dict[torch.device, Tensor] = {}

        def base(logits: Tensor, target: Tensor) -> Tensor:
            # the table moves to each device once: a host-to-device copy per step would sync
            if target.device not in luts:
                luts[target.device] = lut.to(target.device)
            return region_loss(logits, target, luts[target.device])

        return base


# The losses by name (`--loss` reads the names): under region-based training cross-entropy
# becomes binary per region, the Dice term a Dice per region.
LOSSES: dict[str, Loss] = {
    "ce": Loss(classes=cross_entropy_loss, regions=bce_region_loss),
    "ce+dice": Loss(classes=ce_dice_loss, regions=bce_dice_region_loss),
}


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net's weights for outputs at 1, 1/2, 1/4, ... of the size: halving per level,
    normalised to sum to 1, so the full-resolution output keeps the largest share."""
    raw = [0.5**i for i in range(n)]
    return [w / sum(raw) for w in raw]


def downsample_labels(target: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour labels at `size`: the centre pixel of each block, so that no class
    is invented at a boundary (averaging labels would)."""
    fy, fx = target.shape[-2] // size[0], target.shape[-1] // size[1]
    if fy * size[0] != target.shape[-2] or fx * size[1] != target.shape[-1]:
        raise ValueError(
            f"deep supervision: expected an output size that divides the label "
            f"size {tuple(target.shape[-2:])}; found {size}"
        )
    return target[..., fy // 2 :: fy, fx // 2 :: fx]


def deep_supervision_loss(
    outputs: list[Tensor], target: Tensor, loss: Callable[[Tensor, Tensor], Tensor]
) -> Tensor:
    """Weighted sum of `loss` over a U-Net's outputs at decreasing resolutions, each against
    the labels downsampled to its size (nnU-Net's deep supervision)."""
    total = None
    for w, out in zip(deep_supervision_weights(len(outputs)), outputs, strict=True):
        term = w * loss(out, downsample_labels(target, tuple(out.shape[-2:])))
        total = term if total is None else total + term
    return total


def make_loss(
    name: str, labels: LabelSet, regions: bool = False
) -> Callable[[Tensor | list[Tensor], Tensor], Tensor]:
    """The loss called ``name`` as ``loss(logits, target)`` over the classes of ``labels``
    or (``regions``) over its scored regions. A list of logits (a deep-supervised U-Net in
    training) gets the weighted sum."""
    if name not in LOSSES:
        raise ValueError(
            f"unknown loss: expected one of {', '.join(repr(k) for k in LOSSES)}; found "
            f"{name!r}. Fix: choose one of those names."
        )
    base = LOSSES[name].bind(labels, regions)

    def loss(logits: Tensor | list[Tensor], target: Tensor) -> Tensor:
        if isinstance(logits, (list, tuple)):
            return deep_supervision_loss(list(logits), target, base)
        return base(logits, target)

    return loss
