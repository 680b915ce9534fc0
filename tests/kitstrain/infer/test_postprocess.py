"""Connected-component post-processing on small label arrays: what each step keeps and
removes, the decision keeping only the steps that raise their region's Dice, its JSON."""

from __future__ import annotations

import numpy as np
import pytest

from kitsprep.labels import EDITIONS
from kitstrain.infer.postprocess import (
    INSIDE_KIDNEY,
    KIDNEY_SHARE,
    LARGEST,
    Decision,
    Postprocessor,
    Step,
    apply_step,
    apply_steps,
    candidate_steps,
    decide,
    drop_outside,
    keep_large_components,
)

K19, K23 = EDITIONS["kits19"], EDITIONS["kits23"]


def two_kidneys() -> np.ndarray:
    """kits19 labels: a large and a smaller kidney (one with a tumour), a one-voxel speck."""
    labels = np.zeros((6, 24, 24), np.uint8)
    labels[1:5, 2:10, 2:10] = 1  # 256 voxels
    labels[1:4, 14:20, 14:20] = 1  # 108 voxels: over 0.2 of the largest
    labels[2:4, 4:7, 4:7] = 2  # tumour inside the large kidney
    labels[5, 22, 1] = 1  # a speck, away from both
    return labels


def test_kidney_region_keeps_both_kidneys_and_drops_a_speck() -> None:
    labels = two_kidneys()
    out = apply_step(labels, Step(LARGEST, "kidney", KIDNEY_SHARE), K19)
    expected = labels.copy()
    expected[5, 22, 1] = 0
    np.testing.assert_array_equal(out, expected)
    # the largest alone loses the second kidney
    only = keep_large_components(labels > 0, 1.0)
    assert only[1:5, 2:10, 2:10].all() and not only[1:4, 14:20, 14:20].any()


def test_components_touch_by_a_corner() -> None:
    mask = np.zeros((3, 3, 3), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = mask[2, 2, 2] = True  # a diagonal: one 26-component
    np.testing.assert_array_equal(keep_large_components(mask, 1.0), mask)


def test_tumour_outside_the_kidney_is_removed_inside_kept() -> None:
    labels = two_kidneys()
    labels[0:2, 20:23, 2:5] = 2  # a tumour floating away from any kidney
    labels[1:3, 10:12, 4:6] = 2  # a tumour touching the large kidney from outside its box
    out = apply_step(labels, Step(INSIDE_KIDNEY, "tumour"), K19)
    expected = labels.copy()
    expected[0:2, 20:23, 2:5] = 0
    np.testing.assert_array_equal(out, expected)
    # the mask-level function names the voxels to remove
    removed = drop_outside(labels == 2, labels > 0)
    np.testing.assert_array_equal(removed, (labels == 2) & (expected == 0))


def test_kits23_mass_outside_the_kidney_is_removed() -> None:
    labels = np.zeros((4, 16, 16), np.uint8)
    labels[1:3, 2:8, 2:8] = 1
    labels[1:3, 3:5, 3:5] = 3  # a cyst in the kidney: kept
    labels[1:3, 12:15, 12:15] = 2  # a tumour alone: removed
    out = apply_step(labels, Step(INSIDE_KIDNEY, "mass"), K23)
    assert (out[1:3, 3:5, 3:5] == 3).all() and not out[1:3, 12:15, 12:15].any()
    assert (out[1:3, 2:8, 2:8] > 0).all()


def test_candidate_steps_are_per_region_in_a_fixed_order() -> None:
    assert candidate_steps(K19) == (
        Step(LARGEST, "kidney", KIDNEY_SHARE),
        Step(INSIDE_KIDNEY, "tumour"),
        Step(LARGEST, "tumour"),
    )
    assert [(s.kind, s.region) for s in candidate_steps(K23)] == [
        (LARGEST, "kidney_and_mass"),
        (INSIDE_KIDNEY, "mass"),
        (LARGEST, "mass"),
        (INSIDE_KIDNEY, "tumor"),
        (LARGEST, "tumor"),
    ]


def test_decide_keeps_only_the_steps_that_raise_dice() -> None:
    truth = two_kidneys()
    truth[5, 22, 1] = 0
    truth[3:5, 15:17, 15:17] = 2  # a second, smaller tumour in the small kidney
    pred = truth.copy()
    pred[5, 22, 1] = 1  # a kidney speck: removing it raises kidney Dice
    # a tumour outside the kidney, too large for the kidney step (over 0.2 of the largest
    # kidney region's component): removing it raises tumour Dice
    pred[0:2, 12:18, 2:8] = 2
    decision = decide([("case_00000", pred, truth)], K19)
    # keeping the largest tumour alone would drop the true second tumour: not kept
    assert decision.steps == (Step(LARGEST, "kidney", KIDNEY_SHARE), Step(INSIDE_KIDNEY, "tumour"))
    assert decision.dice_after == {"kidney": 1.0, "tumour": 1.0}
    assert decision.dice_before["kidney"] < 1.0 and decision.dice_before["tumour"] < 1.0
    assert decision.cases == 1 and decision.edition == "kits19"
    np.testing.assert_array_equal(apply_steps(pred, decision.steps, K19), truth)
    hook = Postprocessor(decision.steps, K19)
    np.testing.assert_array_equal(hook(pred, (2.5, 0.8, 0.8)), truth)
    assert hook.describe() == [
        "kidney: keep components of >= 0.2 of the largest",
        "tumour: drop components outside the kidney",
    ]


def test_a_perfect_prediction_keeps_no_step() -> None:
    truth = two_kidneys()
    decision = decide([("a", truth, truth), ("b", np.zeros_like(truth), np.zeros_like(truth))], K19)
    assert decision.steps == () and decision.dice_before == decision.dice_after


def test_decision_json_round_trip_and_version() -> None:
    decision = Decision(
        "kits23",
        (Step(LARGEST, "kidney_and_mass", 0.2), Step(INSIDE_KIDNEY, "mass")),
        {"kidney_and_mass": 0.9, "mass": 0.5, "tumor": 0.4},
        {"kidney_and_mass": 0.92, "mass": 0.55, "tumor": 0.4},
        7,
    )
    assert Decision.from_json(decision.to_json()) == decision
    with pytest.raises(ValueError, match="version 99"):
        Decision.from_json(decision.to_json().replace('"version": 1', '"version": 99'))
    with pytest.raises(ValueError, match="not a post-processing decision"):
        Decision.from_json('{"version": 1}')
    with pytest.raises(ValueError, match="Step.kind"):
        Step("biggest", "kidney")
