"""A case's scores: the voxel counts behind every region's Dice (accumulable slice by
slice), the `CaseScore` of a case, and the mean over cases."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from kitsprep.labels import LabelSet, region_mask
from kitstrain.metrics.overlap import (
    BACKGROUND_FLAG,
    MIN_FOREGROUND_SHARE,
    OVERPREDICT_FLAG,
    OVERPREDICT_MARGIN,
    check_shapes,
    dice_from_counts,
)
from kitstrain.metrics.surface import bounding_box, surface_dice, surface_tolerance


@dataclass(eq=False)
class DiceCounts:
    """Voxel counts behind the Dice of every region of one case, accumulable slice by slice.

    Adding slices one at a time gives exactly the 3D per-case Dice without the volume in
    memory; `score_case` counts the foreground box of a whole case in one `add`. Counts are
    int64, because a 512x512x1000 volume overflows int32. Under DDP nothing here is
    all-reduced: validation scores each case whole on one rank and the ranks gather the
    finished `CaseScore`s (`train.fit`). Surface Dice needs whole volumes and is not counted.
    """

    labels: LabelSet
    inter: np.ndarray = None  # type: ignore[assignment]  # per region
    pred: np.ndarray = None  # type: ignore[assignment]
    true: np.ndarray = None  # type: ignore[assignment]
    correct: int = 0
    total: int = 0
    foreground_pred: int = 0  # voxels predicted as any label
    foreground_true: int = 0  # true foreground: what an all-background prediction gets wrong

    def __post_init__(self) -> None:
        n = len(self.labels.regions)
        for name in ("inter", "pred", "true"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(n, np.int64))

    def add(self, pred_labels: np.ndarray, true_labels: np.ndarray) -> None:
        """Count one slice, slab or whole volume of integer labels into these totals."""
        pred_labels, true_labels = np.asarray(pred_labels), np.asarray(true_labels)
        check_shapes(pred_labels, true_labels)
        for k in range(len(self.labels.regions)):
            # one region's masks at a time: a whole case's box holds one mask per volume
            pm = region_mask(pred_labels, self.labels, k)
            tm = region_mask(true_labels, self.labels, k)
            self.inter[k] += np.count_nonzero(pm & tm)
            self.pred[k] += np.count_nonzero(pm)
            self.true[k] += np.count_nonzero(tm)
        self.correct += int(np.count_nonzero(pred_labels == true_labels))
        self.total += int(true_labels.size)
        self.foreground_pred += int(np.count_nonzero(pred_labels))
        self.foreground_true += int(np.count_nonzero(true_labels))


# --------------------------------------------------------------------------- scores


@dataclass(frozen=True)
class CaseScore:
    """Scores of one case (or of the mean over cases, with ``case="mean"``).

    ``dice`` and ``surface_dice`` map region names, in the label set's order, to their
    values; ``surface_dice`` is empty where no spacing was known (validation counts)."""

    case: str
    dice: dict[str, float]
    accuracy: float
    background_accuracy: float
    foreground_pred: float  # voxels predicted foreground (mean row: mean over cases)
    foreground_true: float
    surface_dice: dict[str, float] = field(default_factory=dict)

    @property
    def mean_dice(self) -> float:
        """Mean of the regions' Dice: the KiTS19 ranking score (kidney + tumour) / 2."""
        return float(np.mean(list(self.dice.values())))

    @property
    def background_only(self) -> bool:
        """The truth has foreground and the prediction has (almost) none of it: under
        `MIN_FOREGROUND_SHARE` of its volume."""
        return (
            self.foreground_true > 0
            and self.foreground_pred < MIN_FOREGROUND_SHARE * self.foreground_true
        )

    @property
    def over_predicts(self) -> bool:
        """Accuracy more than `OVERPREDICT_MARGIN` below predicting background everywhere."""
        return self.accuracy < self.background_accuracy - OVERPREDICT_MARGIN

    @property
    def flags(self) -> list[str]:
        return ([BACKGROUND_FLAG] if self.background_only else []) + (
            [OVERPREDICT_FLAG] if self.over_predicts else []
        )


def score_from_counts(case: str, c: DiceCounts) -> CaseScore:
    """Turn the accumulated counts of one case into its Dice scores."""
    if c.total == 0:
        raise ValueError(
            f"score_from_counts: case {case!r} has no voxels counted. Fix: add its slices "
            f"with DiceCounts.add before scoring."
        )
    return CaseScore(
        case=case,
        dice={
            r.name: dice_from_counts(int(c.inter[k]), int(c.pred[k]), int(c.true[k]))
            for k, r in enumerate(c.labels.regions)
        },
        accuracy=c.correct / c.total,
        background_accuracy=(c.total - c.foreground_true) / c.total,
        foreground_pred=c.foreground_pred,
        foreground_true=c.foreground_true,
    )


def score_case(
    case: str,
    pred_labels: np.ndarray,
    true_labels: np.ndarray,
    ls: LabelSet,
    spacing: Sequence[float] | None = None,
) -> CaseScore:
    """Score one whole 3D case: Dice of every region of ``ls``, and with the voxel
    ``spacing`` (mm per array axis) surface Dice at each region's tolerance. The regions are
    measured inside the union bounding box of both foregrounds, where all of them lie."""
    pred_labels, true_labels = np.asarray(pred_labels), np.asarray(true_labels)
    check_shapes(pred_labels, true_labels)
    if true_labels.size == 0:
        raise ValueError(f"score_case: case {case!r} has no voxels. Fix: pass a volume.")
    # Everything is counted inside the union box of both foregrounds: outside it both are
    # background, so they agree. Each volume is walked once in its own memory order (a
    # NIfTI mask is Fortran order, a prediction often C order: mixing them is slow).
    box_p, box_t = bounding_box(pred_labels), bounding_box(true_labels)
    boxes = [b for b in (box_p, box_t) if b is not None]
    box = (
        tuple(
            slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes))
            for a in range(true_labels.ndim)
        )
        if boxes
        else tuple(slice(0, 0) for _ in range(true_labels.ndim))
    )
    counts = DiceCounts(ls)
    counts.add(pred_labels[box], true_labels[box])
    # outside the box both are background: every voxel right, none foreground
    outside = true_labels.size - counts.total
    counts.correct += outside
    counts.total += outside
    s = score_from_counts(case, counts)
    if spacing is None:
        return s
    p, t = pred_labels[box], true_labels[box]
    sd = {
        r.name: surface_dice(
            region_mask(p, ls, k), region_mask(t, ls, k), spacing, surface_tolerance(ls, r)
        )
        for k, r in enumerate(ls.regions)
    }
    return replace(s, surface_dice=sd)


def mean_score(scores: Sequence[CaseScore]) -> CaseScore:
    """Mean of the per-case values (each case weighs the same, as in the KiTS rankings).

    Pooling voxels instead would let the largest scans dominate. The returned row has
    ``case="mean"`` and its flags are judged on these means."""
    if not scores:
        raise ValueError("mean_score: found no case scores. Fix: score at least one case.")

    def mean_of(key: str) -> dict[str, float]:
        names = list(getattr(scores[0], key))
        if any(list(getattr(s, key)) != names for s in scores):
            return {}
        return {n: float(np.mean([getattr(s, key)[n] for s in scores])) for n in names}

    return CaseScore(
        case="mean",
        dice=mean_of("dice"),
        accuracy=float(np.mean([s.accuracy for s in scores])),
        background_accuracy=float(np.mean([s.background_accuracy for s in scores])),
        foreground_pred=float(np.mean([s.foreground_pred for s in scores])),
        foreground_true=float(np.mean([s.foreground_true for s in scores])),
        surface_dice=mean_of("surface_dice"),
    )
