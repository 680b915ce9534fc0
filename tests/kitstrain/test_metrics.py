"""Metrics: official KiTS19 Dice definitions, slice-wise accumulation, the background check."""

from __future__ import annotations

import numpy as np
import pytest

from kitstrain.metrics import (
    CaseScore,
    DiceCounts,
    background_accuracy,
    dice,
    mean_score,
    pixel_accuracy,
    score_case,
    score_from_counts,
)


def official_kits19_dice(predictions: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """Independent reference: the formula of the KiTS19 starter code's evaluation."""
    try:
        tk_pd = np.greater(predictions, 0)
        tk_gt = np.greater(gt, 0)
        tk_dice = 2 * np.logical_and(tk_pd, tk_gt).sum() / (tk_pd.sum() + tk_gt.sum())
    except ZeroDivisionError:
        return 0.0, 0.0
    tu_pd = np.greater(predictions, 1)
    tu_gt = np.greater(gt, 1)
    tu_dice = 2 * np.logical_and(tu_pd, tu_gt).sum() / (tu_pd.sum() + tu_gt.sum())
    return float(tk_dice), float(tu_dice)


def realistic_case(rng: np.random.Generator) -> np.ndarray:
    """A (20, 64, 64) label volume with kidney ~1 % of voxels and a tumour inside."""
    labels = np.zeros((20, 64, 64), dtype=np.uint8)
    labels[5:15, 20:26, 30:37] = 1  # 420 voxels of 81920: ~0.5 %
    labels[5:15, 40:46, 10:17] = 1  # second kidney: ~1 % in all
    labels[8:12, 22:25, 32:35] = 2
    noise = rng.random(labels.shape) < 0.0005
    labels[noise & (labels == 0)] = 1
    return labels


def test_dice_known_values() -> None:
    a = np.array([1, 1, 0, 0], dtype=bool)
    b = np.array([1, 0, 1, 0], dtype=bool)
    assert dice(a, b) == pytest.approx(0.5)  # 2*1 / (2 + 2)
    assert dice(a, a) == 1.0
    assert dice(a, ~a) == 0.0
    c = np.array([1, 1, 1, 0], dtype=bool)
    assert dice(a, c) == pytest.approx(0.8)  # 2*2 / (2 + 3)


def test_dice_empty_cases() -> None:
    empty = np.zeros((4, 4), dtype=bool)
    some = empty.copy()
    some[1, 1] = True
    assert dice(empty, empty) == 1.0
    assert dice(empty, some) == 0.0
    assert dice(some, empty) == 0.0


def test_dice_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="same shape"):
        dice(np.zeros(3, bool), np.zeros(4, bool))


def test_kidney_counts_tumour_voxels_and_tumour_uses_label_above_one() -> None:
    truth = np.array([0, 1, 2, 2, 0, 0])
    # Prediction calls every true kidney/tumour voxel "tumour": kidney Dice is still perfect.
    pred = np.array([0, 2, 2, 2, 0, 0])
    s = score_case("c", pred, truth)
    assert s.kidney_dice == 1.0
    assert s.tumour_dice == pytest.approx(2 * 2 / (3 + 2))
    assert s.mean_dice == pytest.approx((1.0 + 0.8) / 2)
    assert s.accuracy == pytest.approx(5 / 6)
    assert s.background_accuracy == pytest.approx(3 / 6)


def test_no_tumour_anywhere_scores_one() -> None:
    truth = np.array([0, 1, 1, 0])
    s = score_case("c", truth.copy(), truth)
    assert s.tumour_dice == 1.0 and s.kidney_dice == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_score_case_matches_official_formula(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (7, 24, 24)
    truth = rng.choice(3, size=shape, p=[0.8, 0.15, 0.05]).astype(np.uint8)
    pred = truth.copy()
    flip = rng.random(shape) < 0.3
    pred[flip] = rng.integers(0, 3, size=int(flip.sum()))
    s = score_case("case_00000", pred, truth)
    kidney, tumour = official_kits19_dice(pred, truth)
    assert s.kidney_dice == pytest.approx(kidney, abs=1e-12)
    assert s.tumour_dice == pytest.approx(tumour, abs=1e-12)
    assert s.accuracy == pytest.approx(pixel_accuracy(pred, truth))
    assert s.accuracy == pytest.approx(np.mean(pred == truth))
    assert s.background_accuracy == pytest.approx(background_accuracy(truth))
    assert s.background_accuracy == pytest.approx(np.mean(truth == 0))


def test_slice_by_slice_equals_whole_volume() -> None:
    rng = np.random.default_rng(1)
    truth = rng.choice(3, size=(9, 16, 16), p=[0.7, 0.2, 0.1])
    pred = rng.choice(3, size=(9, 16, 16), p=[0.7, 0.2, 0.1])
    counts = DiceCounts()
    for k in range(truth.shape[0]):
        counts.add(pred[k], truth[k])
    assert score_from_counts("c", counts) == score_case("c", pred, truth)


def test_merge_and_array_round_trip() -> None:
    rng = np.random.default_rng(2)
    truth = rng.integers(0, 3, size=(6, 8, 8))
    pred = rng.integers(0, 3, size=(6, 8, 8))
    a, b, whole = DiceCounts(), DiceCounts(), DiceCounts()
    a.add(pred[:2], truth[:2])
    b.add(pred[2:], truth[2:])
    whole.add(pred, truth)
    assert a.merge(b) == whole
    assert a + b == whole
    arr = whole.as_array()
    assert arr.dtype == np.int64 and arr.shape == (9,)
    assert DiceCounts.from_array(arr) == whole
    # The all-reduce sum of the vectors is the merge.
    assert DiceCounts.from_array(a.as_array() + b.as_array()) == whole
    with pytest.raises(ValueError, match="expected 9 values"):
        DiceCounts.from_array(arr[:5])


def test_counts_do_not_overflow_int32() -> None:
    big = 3_000_000_000  # > 2**31, as in a 512x512x1000 volume's kidney-free voxels
    c = DiceCounts(total=big, correct=big, background_correct=big - 10, kidney_true=10)
    assert DiceCounts.from_array(c.as_array()) == c
    assert score_from_counts("c", c).accuracy == 1.0


def test_background_only_flags_all_zero_prediction_not_perfect() -> None:
    truth = realistic_case(np.random.default_rng(0))
    assert 0.005 < np.mean(truth > 0) < 0.02
    lazy = score_case("lazy", np.zeros_like(truth), truth)
    assert lazy.accuracy > 0.98  # the number that looks good ...
    assert lazy.kidney_dice == 0.0
    assert lazy.background_only  # ... and the flag that says it is worthless
    perfect = score_case("perfect", truth.copy(), truth)
    assert not perfect.background_only


def test_background_only_by_accuracy_margin() -> None:
    near = CaseScore("c", 0.9, 0.5, 0.7, accuracy=0.9920, background_accuracy=0.9905)
    far = CaseScore("c", 0.9, 0.5, 0.7, accuracy=0.9990, background_accuracy=0.9905)
    assert near.background_only
    assert not far.background_only
    assert CaseScore("c", 0.05, 0.0, 0.025, 0.9990, 0.9905).background_only


def test_mean_score_averages_cases_not_voxels() -> None:
    small_truth = np.array([0, 1, 1, 0])
    small = score_case("a", small_truth, small_truth)  # Dice 1 on 4 voxels
    big_truth = np.zeros(1000, dtype=np.int64)
    big_truth[:100] = 2
    big_pred = np.zeros_like(big_truth)
    big = score_case("b", big_pred, big_truth)  # Dice 0 on 1000 voxels
    m = mean_score([small, big])
    assert m.case == "mean"
    assert m.kidney_dice == pytest.approx(0.5)
    assert m.tumour_dice == pytest.approx((1.0 + 0.0) / 2)
    assert m.accuracy == pytest.approx((1.0 + 0.9) / 2)
    assert m.background_accuracy == pytest.approx((0.5 + 0.9) / 2)
    assert m.background_only == (
        m.kidney_dice < 0.1 or abs(m.accuracy - m.background_accuracy) <= 0.002
    )
    with pytest.raises(ValueError, match="no case scores"):
        mean_score([])


def test_mean_row_flags_lazy_model() -> None:
    rng = np.random.default_rng(3)
    truths = [realistic_case(rng) for _ in range(3)]
    lazy = mean_score([score_case(f"c{i}", np.zeros_like(t), t) for i, t in enumerate(truths)])
    good = mean_score([score_case(f"c{i}", t.copy(), t) for i, t in enumerate(truths)])
    assert lazy.background_only
    assert not good.background_only


def test_empty_volume_is_an_error() -> None:
    with pytest.raises(ValueError, match="no voxels"):
        score_from_counts("case_00001", DiceCounts())
