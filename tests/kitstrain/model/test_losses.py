"""Losses: Dice extremes, gradients, float32 under autocast, the name registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kitsprep.labels import EDITIONS, region_masks
from kitstrain.model.losses import (
    LOSSES,
    Loss,
    ce_dice_loss,
    cross_entropy_loss,
    make_loss,
    region_lut,
    region_targets,
    soft_dice_loss,
)

C = 3
KITS19 = EDITIONS["kits19"]


def make_target() -> torch.Tensor:
    target = torch.zeros(2, 16, 16, dtype=torch.int64)
    target[:, 4:10, 4:10] = 1
    target[:, 6:8, 6:8] = 2
    return target


def confident_logits(labels: torch.Tensor, scale: float = 50.0) -> torch.Tensor:
    return scale * F.one_hot(labels, C).permute(0, 3, 1, 2).float()


def test_perfect_logits_give_zero_dice_loss() -> None:
    target = make_target()
    loss = soft_dice_loss(confident_logits(target), target, C)
    assert loss.item() == pytest.approx(0.0, abs=1e-4)
    assert ce_dice_loss(confident_logits(target), target, C).item() == pytest.approx(0, abs=1e-4)


def test_wrong_logits_give_dice_loss_near_one() -> None:
    target = make_target()
    wrong = (target + 1) % C  # every voxel confidently the wrong class
    loss = soft_dice_loss(confident_logits(wrong), target, C)
    assert loss.item() == pytest.approx(1.0, abs=1e-4)
    # Predicting background everywhere is also worth nothing to the Dice term.
    lazy = soft_dice_loss(confident_logits(torch.zeros_like(target)), target, C)
    assert lazy.item() == pytest.approx(1.0, abs=1e-4)


def test_absent_class_predicted_absent_costs_nothing() -> None:
    target = make_target()
    target[target == 2] = 1  # no tumour in this batch
    loss = soft_dice_loss(confident_logits(target), target, C)
    assert loss.item() == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("name", ["ce", "ce+dice"])
def test_gradients_flow(name: str) -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, C, 16, 16, requires_grad=True)
    loss = make_loss(name, KITS19)(logits, make_target())
    assert loss.dim() == 0 and loss.item() > 0
    loss.backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_dice_gradient_is_nonzero() -> None:
    logits = torch.zeros(2, C, 16, 16, requires_grad=True)
    soft_dice_loss(logits, make_target(), C).backward()
    assert logits.grad.abs().sum() > 0


def test_float32_under_autocast_bfloat16() -> None:
    torch.manual_seed(0)
    w = torch.randn(C, 1, 1, 1, requires_grad=True)
    x = torch.randn(2, 1, 16, 16)
    target = make_target()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = F.conv2d(x, w)
        assert logits.dtype == torch.bfloat16
        losses = {
            "dice": soft_dice_loss(logits, target, C),
            "ce": cross_entropy_loss(logits, target, C),
            "ce+dice": ce_dice_loss(logits, target, C),
        }
    for name, loss in losses.items():
        assert loss.dtype == torch.float32, name
        ref = {"dice": soft_dice_loss, "ce": cross_entropy_loss, "ce+dice": ce_dice_loss}[name]
        assert loss.item() == pytest.approx(ref(logits.float(), target, C).item(), rel=1e-5)
    losses["ce+dice"].backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_ce_matches_torch() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, C, 8, 8)
    target = torch.randint(0, C, (2, 8, 8))
    assert torch.allclose(cross_entropy_loss(logits, target, C), F.cross_entropy(logits, target))


def test_ce_dice_weight() -> None:
    torch.manual_seed(2)
    logits = torch.randn(2, C, 8, 8)
    target = torch.randint(0, C, (2, 8, 8))
    ce = cross_entropy_loss(logits, target, C)
    dl = soft_dice_loss(logits, target, C)
    assert torch.allclose(ce_dice_loss(logits, target, C, dice_weight=0.5), ce + 0.5 * dl)


def test_make_loss_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"'ce', 'ce\+dice'.*found 'dice'"):
        make_loss("dice", KITS19)


def test_shape_and_dtype_errors() -> None:
    logits = torch.randn(2, C, 8, 8)
    with pytest.raises(ValueError, match="num_classes=4"):
        soft_dice_loss(logits, torch.zeros(2, 8, 8, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="not one-hot"):
        cross_entropy_loss(logits, torch.zeros(2, 1, 8, 8, dtype=torch.int64), C)
    with pytest.raises(ValueError, match="int64"):
        ce_dice_loss(logits, torch.zeros(2, 8, 8, dtype=torch.uint8), C)


def test_deep_supervision_weights_halve_and_sum_to_one() -> None:
    from kitstrain.model.losses import deep_supervision_weights

    w = deep_supervision_weights(3)
    assert w == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert deep_supervision_weights(1) == [1.0]


def test_downsampled_labels_are_block_centres() -> None:
    from kitstrain.model.losses import downsample_labels

    target = torch.arange(64).reshape(1, 8, 8)
    half = downsample_labels(target, (4, 4))
    assert half.shape == (1, 4, 4)
    assert half[0, 0, 0] == target[0, 1, 1] and half[0, 3, 3] == target[0, 7, 7]
    with pytest.raises(ValueError, match="divides the label size"):
        downsample_labels(target, (3, 3))


def test_deep_supervision_loss_is_the_weighted_sum_over_scales() -> None:
    from kitstrain.model.losses import downsample_labels

    torch.manual_seed(0)
    target = make_target()
    outputs = [torch.randn(2, C, 16, 16), torch.randn(2, C, 8, 8), torch.randn(2, C, 4, 4)]
    loss = make_loss("ce+dice", KITS19)
    expected = sum(
        w * ce_dice_loss(o, downsample_labels(target, o.shape[-2:]), C)
        for w, o in zip([4 / 7, 2 / 7, 1 / 7], outputs, strict=True)
    )
    torch.testing.assert_close(loss(outputs, target), expected)
    # one tensor is the plain loss, as before
    torch.testing.assert_close(loss(outputs[0], target), ce_dice_loss(outputs[0], target, C))


def test_region_targets_are_the_scored_regions() -> None:
    target = make_target()
    r = region_targets(target, region_lut(KITS19))
    assert r.shape == (2, 2, 16, 16) and r.dtype == torch.float32
    assert torch.equal(r[:, 0].bool(), target > 0)  # kidney + tumour
    assert torch.equal(r[:, 1].bool(), target > 1)  # tumour


@pytest.mark.parametrize("edition", sorted(EDITIONS))
def test_region_targets_equal_the_label_sets_region_masks(edition: str) -> None:
    ls = EDITIONS[edition]
    target = torch.from_numpy(
        np.random.default_rng(0).integers(0, ls.num_classes, (3, 8, 8))
    ).long()
    got = region_targets(target, region_lut(ls))
    assert got.shape == (3, len(ls.regions), 8, 8)
    want = np.moveaxis(region_masks(target.numpy(), ls), 0, 1)  # (N, regions, H, W)
    assert np.array_equal(got.bool().numpy(), want)


def test_region_losses_extremes_and_names() -> None:
    from kitstrain.model.losses import bce_dice_region_loss, soft_dice_region_loss

    target = make_target()
    lut = region_lut(KITS19)
    perfect = 50.0 * (2 * region_targets(target, lut) - 1)  # +50 inside a region, -50 outside
    assert soft_dice_region_loss(perfect, target, lut).item() < 1e-4
    assert bce_dice_region_loss(perfect, target, lut).item() < 1e-4
    assert soft_dice_region_loss(-perfect, target, lut).item() > 0.99
    loss = make_loss("ce+dice", KITS19, regions=True)
    torch.testing.assert_close(loss(perfect, target), bce_dice_region_loss(perfect, target, lut))
    bce = make_loss("ce", KITS19, regions=True)(torch.zeros(2, 2, 16, 16), target)
    torch.testing.assert_close(bce, torch.tensor(0.6931), atol=1e-4, rtol=0)  # log 2
    with pytest.raises(ValueError, match=r"expected 2 region logits.*regions=True"):
        loss(torch.zeros(2, 3, 16, 16), target)


def test_kits23_losses_have_three_regions_and_four_classes() -> None:
    ls = EDITIONS["kits23"]
    target = make_target()
    target[:, 12:14, 12:14] = 3  # a cyst
    perfect = 50.0 * (2 * region_targets(target, region_lut(ls)) - 1)
    assert perfect.shape[1] == 3
    assert make_loss("ce+dice", ls, regions=True)(perfect, target).item() < 1e-4
    classes = 50.0 * F.one_hot(target, 4).permute(0, 3, 1, 2).float()
    assert make_loss("ce+dice", ls)(classes, target).item() < 1e-4


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("edition", sorted(EDITIONS))
def test_every_registered_loss_builds_in_both_forms(name: str, edition: str) -> None:
    """One registry: a name is a loss over classes and over regions alike."""
    ls = EDITIONS[edition]
    entry = LOSSES[name]
    assert isinstance(entry, Loss) and callable(entry.classes) and callable(entry.regions)
    torch.manual_seed(0)
    target = make_target()
    for regions, channels in ((False, ls.num_classes), (True, len(ls.regions))):
        logits = torch.randn(2, channels, 16, 16, requires_grad=True)
        loss = make_loss(name, ls, regions=regions)
        value = loss(logits, target)
        assert value.dim() == 0 and torch.isfinite(value) and value.item() > 0
        value.backward()
        assert torch.isfinite(logits.grad).all()
        # a deep-supervised list of outputs goes through the same entry
        coarse = torch.randn(2, channels, 8, 8)
        assert torch.isfinite(loss([logits.detach(), coarse], target))


def test_region_lut_is_the_label_sets_region_table() -> None:
    for ls in EDITIONS.values():
        lut = region_lut(ls)
        assert lut.dtype == torch.bool
        assert np.array_equal(lut.numpy(), ls.region_table())
