"""Metrics: official Dice per region of each edition, surface Dice against the official
evaluator's code, slice-wise accumulation, the background-only and over-prediction flags."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage

from kitsprep.labels import EDITIONS
from kitstrain.metrics import (
    CaseScore,
    DiceCounts,
    background_accuracy,
    dice,
    foreground_box,
    mean_score,
    pixel_accuracy,
    score_case,
    score_from_counts,
    surface_dice,
    surface_tolerance,
)

K19 = EDITIONS["kits19"]
K23 = EDITIONS["kits23"]
KIDNEY_TOL = K23.region("kidney_and_mass").tolerance_mm
ANISO = (2.5, 0.8, 0.7)  # mm per axis: thick slices, as in most KiTS scans


def official_surface_dice(pred: np.ndarray, truth: np.ndarray, spacing, tol: float) -> float:
    """Independent reference: kits23's `compute_metrics_for_label` surface Dice branch, i.e.
    DeepMind's `surface_distance` on the whole volume, empty conventions first."""
    import surface_distance

    if not truth.any() and not pred.any():
        return 1.0
    if not truth.any() or not pred.any():
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # its scipy.ndimage.filters path
        dist = surface_distance.compute_surface_distances(truth, pred, tuple(spacing))
    return float(surface_distance.compute_surface_dice_at_tolerance(dist, tol))


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
    s = score_case("c", pred, truth, K19)
    assert s.dice["kidney"] == 1.0
    assert s.dice["tumour"] == pytest.approx(2 * 2 / (3 + 2))
    assert s.mean_dice == pytest.approx((1.0 + 0.8) / 2)
    assert s.accuracy == pytest.approx(5 / 6)
    assert s.background_accuracy == pytest.approx(3 / 6)


def test_no_tumour_anywhere_scores_one() -> None:
    truth = np.array([0, 1, 1, 0])
    s = score_case("c", truth.copy(), truth, K19)
    assert s.dice["tumour"] == 1.0 and s.dice["kidney"] == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_score_case_matches_official_formula(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (7, 24, 24)
    truth = rng.choice(3, size=shape, p=[0.8, 0.15, 0.05]).astype(np.uint8)
    pred = truth.copy()
    flip = rng.random(shape) < 0.3
    pred[flip] = rng.integers(0, 3, size=int(flip.sum()))
    s = score_case("case_00000", pred, truth, K19)
    kidney, tumour = official_kits19_dice(pred, truth)
    assert s.dice["kidney"] == pytest.approx(kidney, abs=1e-12)
    assert s.dice["tumour"] == pytest.approx(tumour, abs=1e-12)
    assert s.accuracy == pytest.approx(pixel_accuracy(pred, truth))
    assert s.accuracy == pytest.approx(np.mean(pred == truth))
    assert s.background_accuracy == pytest.approx(background_accuracy(truth))
    assert s.background_accuracy == pytest.approx(np.mean(truth == 0))


def test_slice_by_slice_equals_whole_volume() -> None:
    rng = np.random.default_rng(1)
    truth = rng.choice(3, size=(9, 16, 16), p=[0.7, 0.2, 0.1])
    pred = rng.choice(3, size=(9, 16, 16), p=[0.7, 0.2, 0.1])
    counts = DiceCounts(K19)
    for k in range(truth.shape[0]):
        counts.add(pred[k], truth[k])
    assert score_from_counts("c", counts) == score_case("c", pred, truth, K19)


def counted(c: DiceCounts) -> tuple:
    return (
        c.labels,
        c.inter.tolist(),
        c.pred.tolist(),
        c.true.tolist(),
        c.correct,
        c.total,
        c.foreground_pred,
        c.foreground_true,
    )


def test_slabs_in_any_cut_count_what_the_whole_volume_does() -> None:
    rng = np.random.default_rng(2)
    truth = rng.integers(0, 3, size=(6, 8, 8))
    pred = rng.integers(0, 3, size=(6, 8, 8))
    slabs, whole = DiceCounts(K19), DiceCounts(K19)
    slabs.add(pred[:2], truth[:2])
    slabs.add(pred[2:], truth[2:])
    whole.add(pred, truth)
    assert counted(slabs) == counted(whole)
    assert whole.inter.dtype == np.int64 and whole.total == truth.size
    with pytest.raises(ValueError, match="same shape"):
        whole.add(pred[:1], truth[:2])


def test_counts_do_not_overflow_int32() -> None:
    big = 3_000_000_000  # > 2**31, as in a 512x512x1000 volume's kidney-free voxels
    c = DiceCounts(K19, total=big, correct=big, foreground_true=10)
    c.true[0] = 10
    c.inter[0] = big
    c.add(np.ones((2, 2), np.uint8), np.ones((2, 2), np.uint8))
    assert c.inter[0] == big + 4 and c.total == big + 4 and c.correct == big + 4
    assert score_from_counts("c", c).accuracy == 1.0


def test_background_only_flags_all_zero_prediction_not_perfect() -> None:
    truth = realistic_case(np.random.default_rng(0))
    assert 0.005 < np.mean(truth > 0) < 0.02
    lazy = score_case("lazy", np.zeros_like(truth), truth, K19)
    assert lazy.accuracy > 0.98  # the number that looks good ...
    assert lazy.dice["kidney"] == 0.0
    assert lazy.background_only  # ... and the flag that says it is worthless
    perfect = score_case("perfect", truth.copy(), truth, K19)
    assert not perfect.background_only


def test_flags_say_what_they_name() -> None:
    def case(acc: float, bg: float, fg_pred: int, fg_true: int) -> CaseScore:
        return CaseScore("c", {"kidney": 0.66, "tumour": 0.3}, acc, bg, fg_pred, fg_true)

    # The newcomer's case: kidney Dice 0.66, accuracy within 0.2 points of the baseline.
    weak = case(0.9890, 0.9882, 700, 1000)
    assert weak.flags == []
    assert case(0.99, 0.99, 99, 1000).flags == ["background-only model"]
    assert not case(0.99, 0.99, 100, 1000).background_only
    assert not case(1.0, 1.0, 0, 0).background_only  # nothing to find, nothing found
    # The other failure, named apart: foreground painted everywhere.
    over = case(0.42, 0.996, 580_000, 4_000)
    assert over.flags == ["over-predicts foreground"]
    assert not case(0.986, 0.996, 5000, 4000).over_predicts  # 1.0 point: the margin


def test_mean_score_averages_cases_not_voxels() -> None:
    small_truth = np.array([0, 1, 1, 0])
    small = score_case("a", small_truth, small_truth, K19)  # Dice 1 on 4 voxels
    big_truth = np.zeros(1000, dtype=np.int64)
    big_truth[:100] = 2
    big_pred = np.zeros_like(big_truth)
    big = score_case("b", big_pred, big_truth, K19)  # Dice 0 on 1000 voxels
    m = mean_score([small, big])
    assert m.case == "mean"
    assert m.dice["kidney"] == pytest.approx(0.5)
    assert m.dice["tumour"] == pytest.approx((1.0 + 0.0) / 2)
    assert m.accuracy == pytest.approx((1.0 + 0.9) / 2)
    assert m.background_accuracy == pytest.approx((0.5 + 0.9) / 2)
    assert m.foreground_true == pytest.approx((2 + 100) / 2)
    assert m.foreground_pred == pytest.approx((2 + 0) / 2)
    assert m.background_only  # 1 voxel predicted of 51 true, on average
    with pytest.raises(ValueError, match="no case scores"):
        mean_score([])


def test_mean_row_flags_lazy_model() -> None:
    rng = np.random.default_rng(3)
    truths = [realistic_case(rng) for _ in range(3)]
    lazy = mean_score([score_case(f"c{i}", np.zeros_like(t), t, K19) for i, t in enumerate(truths)])
    good = mean_score([score_case(f"c{i}", t.copy(), t, K19) for i, t in enumerate(truths)])
    assert lazy.background_only
    assert not good.background_only


def test_empty_volume_is_an_error() -> None:
    with pytest.raises(ValueError, match="no voxels"):
        score_from_counts("case_00001", DiceCounts(K19))


# --------------------------------------------------------------------------- KiTS21/23 regions


def test_a_cyst_predicted_as_tumour_does_not_score_tumour_dice_one() -> None:
    truth = np.zeros((6, 10, 10), np.uint8)
    truth[1:5, 2:8, 2:8] = 1
    truth[2:4, 3:5, 3:5] = 3  # a cyst, no tumour
    pred = truth.copy()
    pred[pred == 3] = 2  # the cyst called tumour
    s = score_case("c", pred, truth, K23, ANISO)
    assert list(s.dice) == ["kidney_and_mass", "mass", "tumor"]
    assert s.dice["kidney_and_mass"] == 1.0 and s.dice["mass"] == 1.0
    assert s.dice["tumor"] == 0.0 and s.surface_dice["tumor"] == 0.0
    assert s.surface_dice["kidney_and_mass"] == 1.0 and s.surface_dice["mass"] == 1.0
    assert s.mean_dice == pytest.approx(2 / 3)


def test_kits23_region_dice_is_the_label_union() -> None:
    rng = np.random.default_rng(4)
    truth = rng.choice(4, size=(5, 12, 12), p=[0.6, 0.2, 0.1, 0.1]).astype(np.uint8)
    pred = rng.choice(4, size=truth.shape, p=[0.6, 0.2, 0.1, 0.1]).astype(np.uint8)
    s = score_case("c", pred, truth, K23)
    assert s.dice["kidney_and_mass"] == pytest.approx(dice(pred > 0, truth > 0))
    assert s.dice["mass"] == pytest.approx(dice(np.isin(pred, (2, 3)), np.isin(truth, (2, 3))))
    assert s.dice["tumor"] == pytest.approx(dice(pred == 2, truth == 2))
    assert s.surface_dice == {}  # no spacing, no surface Dice
    counts = DiceCounts(K23)
    for k in range(truth.shape[0]):
        counts.add(pred[k], truth[k])
    assert score_from_counts("c", counts) == s


def test_kits19_surface_dice_uses_the_kits21_tolerance_of_the_same_region() -> None:
    assert surface_tolerance(K19, K19.region("kidney")) == KIDNEY_TOL
    assert surface_tolerance(K19, K19.region("tumour")) == K23.region("tumor").tolerance_mm
    assert surface_tolerance(K23, K23.region("mass")) == K23.region("mass").tolerance_mm


# --------------------------------------------------------------------------- surface Dice


def blob(shape: tuple[int, int, int], seed: int, p: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndimage.binary_opening(ndimage.gaussian_filter(rng.random(shape), 1.5) > p)


def test_surface_dice_empty_conventions() -> None:
    empty = np.zeros((4, 5, 6), bool)
    some = empty.copy()
    some[1, 2, 3] = True
    assert surface_dice(empty, empty, ANISO, 1.0) == 1.0
    assert surface_dice(empty, some, ANISO, 1.0) == 0.0
    assert surface_dice(some, empty, ANISO, 1.0) == 0.0


def surface_cases() -> list[tuple[str, np.ndarray, np.ndarray]]:
    shape = (9, 14, 16)
    one = np.zeros(shape, bool)
    one[4, 6, 7] = True
    cases = [
        ("one voxel", one, one.copy()),
        ("one voxel, next slice", np.roll(one, 1, 0), one),
        ("one voxel, next column", np.roll(one, 1, 2), one),
    ]
    edge = np.zeros(shape, bool)
    edge[:3, :, :5] = True  # touches five faces of the volume
    cases.append(("edge", edge, np.roll(edge, 1, 2)))
    cases.append(("everything vs edge", np.ones(shape, bool), edge))
    cases.append(
        ("corner voxel", np.pad(np.ones((1, 1, 1), bool), ((0, 8), (0, 13), (0, 15))), edge)
    )
    for seed in range(4):
        t = blob((12, 20, 18), seed)
        cases.append((f"blob {seed} dilated", ndimage.binary_dilation(t), t))
        cases.append((f"blob {seed} shifted", np.roll(t, (1, -2, 1), (0, 1, 2)), t))
        cases.append((f"blob {seed} other", blob((12, 20, 18), seed + 10), t))
    return cases


@pytest.mark.parametrize("spacing", [ANISO, (0.5, 0.9, 0.9), (5.0, 0.52, 0.61)])
def test_surface_dice_equals_the_official_evaluator(spacing) -> None:
    for name, pred, truth in surface_cases():
        for tol in (KIDNEY_TOL, K23.region("tumor").tolerance_mm, 3.0):
            ours = surface_dice(pred, truth, spacing, tol)
            ref = official_surface_dice(pred, truth, spacing, tol)
            assert ours == pytest.approx(ref, abs=1e-4), (name, spacing, tol)
    # a far miss and a perfect match are the bounds
    t = blob((12, 20, 18), 0)
    assert surface_dice(t, t, spacing, 1.0) == 1.0
    far = np.zeros_like(t)
    far[0, 0, 0] = True
    t[:3] = False
    assert surface_dice(far, t, spacing, 0.1) == 0.0


def test_score_case_surface_dice_per_region_equals_the_official_evaluator() -> None:
    truth = np.zeros((14, 24, 22), np.uint8)
    truth[blob(truth.shape, 1, 0.45)] = 1
    truth[blob(truth.shape, 2, 0.6) & (truth == 1)] = 2
    truth[blob(truth.shape, 3, 0.62) & (truth == 1)] = 3
    pred = np.roll(truth, 1, axis=2)
    s = score_case("c", pred, truth, K23, ANISO)
    for r in K23.regions:
        ref = official_surface_dice(
            np.isin(pred, r.labels), np.isin(truth, r.labels), ANISO, r.tolerance_mm
        )
        assert s.surface_dice[r.name] == pytest.approx(ref, abs=1e-4), r.name
    assert 0.0 < s.surface_dice["kidney_and_mass"] < 1.0


def test_foreground_box() -> None:
    m = np.zeros((4, 5, 6), bool)
    assert foreground_box(m) == (slice(0, 4), slice(0, 5), slice(0, 6))
    m[1, 2, 3] = m[2, 4, 3] = True
    assert foreground_box(m) == (slice(1, 3), slice(2, 5), slice(3, 4))


def test_score_case_on_empty_volumes_and_fortran_order() -> None:
    empty = np.zeros((3, 4, 5), np.uint8)
    s = score_case("c", empty, empty.copy(), K23, ANISO)
    assert s.dice == {"kidney_and_mass": 1.0, "mass": 1.0, "tumor": 1.0}
    assert s.surface_dice == s.dice and s.accuracy == 1.0 and not s.flags
    rng = np.random.default_rng(5)
    truth = rng.choice(4, size=(6, 9, 11), p=[0.7, 0.1, 0.1, 0.1]).astype(np.uint8)
    pred = np.roll(truth, 1, axis=1)
    c_order = score_case("c", pred, truth, K23, ANISO)
    assert score_case("c", pred, np.asfortranarray(truth), K23, ANISO) == c_order  # NIfTI
    assert c_order.accuracy == pytest.approx(np.mean(pred == truth))
