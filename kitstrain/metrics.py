"""KiTS19-official Dice per case, plus the pixel accuracy that hides a useless model.

The definitions follow the evaluation in the official KiTS19 starter code
(``starter_code/evaluation.py``): kidney Dice compares ``label > 0`` in prediction and
truth (so tumour voxels count as kidney), tumour Dice compares ``label > 1``, and
Dice = 2|P ∩ G| / (|P| + |G|), computed over the whole 3D case, not averaged over slices.

Pixel accuracy is reported next to the accuracy of predicting background everywhere,
because on KiTS19 the latter is already about 99 %: a model is only worth its accuracy
if it beats that baseline, which :attr:`CaseScore.background_only` checks.

Pure numpy so that scoring needs no torch and runs anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import astuple, dataclass, fields

import numpy as np

__all__ = [
    "BACKGROUND_MARGIN",
    "MIN_KIDNEY_DICE",
    "CaseScore",
    "DiceCounts",
    "background_accuracy",
    "dice",
    "mean_score",
    "pixel_accuracy",
    "score_case",
    "score_from_counts",
]

# A case counts as "background only" if its pixel accuracy is within this many (fractional)
# points of the all-background accuracy (0.002 = 0.2 percentage points) ...
BACKGROUND_MARGIN = 0.002
# ... or if it finds almost none of the kidney.
MIN_KIDNEY_DICE = 0.1


def _check_shapes(pred: np.ndarray, truth: np.ndarray) -> None:
    if pred.shape != truth.shape:
        raise ValueError(
            f"prediction and truth must have the same shape; found {pred.shape} and "
            f"{truth.shape}. Fix: map the prediction back to the label geometry first."
        )


def _dice_from(inter: int, n_pred: int, n_true: int) -> float:
    # The official code returns NaN when both masks are empty (0/0). Finding nothing where
    # there is nothing is a perfect answer, and a NaN would poison every mean, so: 1.0.
    if n_pred + n_true == 0:
        return 1.0
    return 2.0 * inter / (n_pred + n_true)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice = 2|P ∩ G| / (|P| + |G|) of two boolean masks of the same shape.

    Non-boolean arrays are read as ``!= 0``. Both masks empty gives 1.0 (the official code
    gives NaN there; see the module docstring); one empty and the other not gives 0.0.
    """
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    _check_shapes(p, t)
    inter = int(np.count_nonzero(np.logical_and(p, t)))
    return _dice_from(inter, int(np.count_nonzero(p)), int(np.count_nonzero(t)))


def pixel_accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of voxels whose predicted label equals the true label."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    _check_shapes(pred, truth)
    if truth.size == 0:
        raise ValueError("pixel_accuracy: found empty arrays. Fix: pass at least one voxel.")
    return int(np.count_nonzero(pred == truth)) / truth.size


def background_accuracy(truth: np.ndarray) -> float:
    """Accuracy of predicting background everywhere: the fraction of voxels that are 0."""
    truth = np.asarray(truth)
    if truth.size == 0:
        raise ValueError("background_accuracy: found an empty array. Fix: pass a volume.")
    return (truth.size - int(np.count_nonzero(truth))) / truth.size


@dataclass
class DiceCounts:
    """Voxel counts behind every score of one case, accumulable slice by slice.

    Adding slices one at a time gives exactly the 3D per-case Dice without the volume in
    memory; adding two counts (``merge`` or ``+``) reduces partial counts, e.g. across DDP
    ranks via ``as_array`` / ``from_array``. Counts are Python ints (exported as int64),
    because a 512x512x1000 volume overflows int32.
    """

    kidney_inter: int = 0
    kidney_pred: int = 0
    kidney_true: int = 0
    tumour_inter: int = 0
    tumour_pred: int = 0
    tumour_true: int = 0
    correct: int = 0
    total: int = 0
    background_correct: int = 0  # voxels an all-background prediction gets right

    def add(self, pred_labels: np.ndarray, true_labels: np.ndarray) -> None:
        """Count one slice, slab or whole volume of integer labels into these totals."""
        pred_labels, true_labels = np.asarray(pred_labels), np.asarray(true_labels)
        _check_shapes(pred_labels, true_labels)
        pk, tk = pred_labels > 0, true_labels > 0
        pt, tt = pred_labels > 1, true_labels > 1
        n_true_kidney = int(np.count_nonzero(tk))
        self.kidney_inter += int(np.count_nonzero(pk & tk))
        self.kidney_pred += int(np.count_nonzero(pk))
        self.kidney_true += n_true_kidney
        self.tumour_inter += int(np.count_nonzero(pt & tt))
        self.tumour_pred += int(np.count_nonzero(pt))
        self.tumour_true += int(np.count_nonzero(tt))
        self.correct += int(np.count_nonzero(pred_labels == true_labels))
        self.total += int(true_labels.size)
        self.background_correct += int(true_labels.size) - n_true_kidney

    def merge(self, other: DiceCounts) -> DiceCounts:
        """A new DiceCounts holding the sum of both; neither operand changes."""
        return DiceCounts(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    __add__ = merge

    def as_array(self) -> np.ndarray:
        """The counts as an int64 vector in field order, ready for an all-reduce (sum)."""
        return np.array(astuple(self), dtype=np.int64)

    @classmethod
    def from_array(cls, arr: np.ndarray) -> DiceCounts:
        """Inverse of :meth:`as_array`."""
        values = np.asarray(arr).reshape(-1)
        n = len(fields(cls))
        if values.shape[0] != n:
            raise ValueError(
                f"DiceCounts.from_array: expected {n} values; found {values.shape[0]}. "
                f"Fix: pass the vector made by DiceCounts.as_array()."
            )
        return cls(*(int(v) for v in values))


@dataclass(frozen=True)
class CaseScore:
    """Scores of one case (or of the mean over cases, with ``case="mean"``)."""

    case: str
    kidney_dice: float
    tumour_dice: float
    mean_dice: float  # (kidney + tumour) / 2, the KiTS19 ranking score
    accuracy: float
    background_accuracy: float

    @property
    def background_only(self) -> bool:
        """True if the prediction is indistinguishable from "background everywhere".

        That is: pixel accuracy within 0.2 percentage points of the all-background
        accuracy, or kidney Dice below 0.1. Note that on a case whose true kidney is
        itself under 0.2 % of the voxels, even a perfect prediction is within the margin.
        """
        near_baseline = abs(self.accuracy - self.background_accuracy) <= BACKGROUND_MARGIN
        return near_baseline or self.kidney_dice < MIN_KIDNEY_DICE


def score_from_counts(case: str, c: DiceCounts) -> CaseScore:
    """Turn the accumulated counts of one case into its scores."""
    if c.total == 0:
        raise ValueError(
            f"score_from_counts: case {case!r} has no voxels counted. Fix: add its slices "
            f"with DiceCounts.add before scoring."
        )
    kidney = _dice_from(c.kidney_inter, c.kidney_pred, c.kidney_true)
    tumour = _dice_from(c.tumour_inter, c.tumour_pred, c.tumour_true)
    return CaseScore(
        case=case,
        kidney_dice=kidney,
        tumour_dice=tumour,
        mean_dice=(kidney + tumour) / 2.0,
        accuracy=c.correct / c.total,
        background_accuracy=c.background_correct / c.total,
    )


def score_case(case: str, pred_labels: np.ndarray, true_labels: np.ndarray) -> CaseScore:
    """Score one whole case from its predicted and true label volumes."""
    counts = DiceCounts()
    counts.add(pred_labels, true_labels)
    return score_from_counts(case, counts)


def mean_score(scores: Sequence[CaseScore]) -> CaseScore:
    """Mean of the per-case values (each case weighs the same, as in the KiTS19 ranking).

    Pooling voxels instead would let the largest scans dominate. The returned row has
    ``case="mean"`` and its ``background_only`` is judged on these means.
    """
    if not scores:
        raise ValueError("mean_score: found no case scores. Fix: score at least one case.")
    return CaseScore(
        case="mean",
        kidney_dice=float(np.mean([s.kidney_dice for s in scores])),
        tumour_dice=float(np.mean([s.tumour_dice for s in scores])),
        mean_dice=float(np.mean([s.mean_dice for s in scores])),
        accuracy=float(np.mean([s.accuracy for s in scores])),
        background_accuracy=float(np.mean([s.background_accuracy for s in scores])),
    )
