"""Overlap of a prediction with the truth: Dice, pixel accuracy, and the accuracy of
predicting background everywhere, with the flags for a model that fails that comparison."""

from __future__ import annotations

import numpy as np

BACKGROUND_FLAG = "background-only model"
OVERPREDICT_FLAG = "over-predicts foreground"
# "Background only": the truth has foreground and the prediction has under a tenth of its
# volume. Such a prediction cannot reach a foreground Dice of 0.2; one that finds two thirds
# of the kidney is a weak model, not a blind one.
MIN_FOREGROUND_SHARE = 0.1
# "Over-predicts": accuracy more than 1 point below predicting background everywhere. Kidney
# and masses are under 1 % of a CT's voxels, so that many false positives are several kidneys'
# worth: the model paints foreground where there is none.
OVERPREDICT_MARGIN = 0.01


def check_shapes(pred: np.ndarray, truth: np.ndarray) -> None:
    if pred.shape != truth.shape:
        raise ValueError(
            f"prediction and truth must have the same shape; found {pred.shape} and "
            f"{truth.shape}. Fix: map the prediction back to the label geometry first."
        )


def dice_from_counts(inter: int, n_pred: int, n_true: int) -> float:
    if n_pred + n_true == 0:
        return 1.0
    return 2.0 * inter / (n_pred + n_true)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice = 2|P ∩ G| / (|P| + |G|) of two masks of the same shape (read as ``!= 0``).
    Both empty: 1.0; one empty: 0.0."""
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    check_shapes(p, t)
    inter = int(np.count_nonzero(np.logical_and(p, t)))
    return dice_from_counts(inter, int(np.count_nonzero(p)), int(np.count_nonzero(t)))


def pixel_accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of voxels whose predicted label equals the true label."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    check_shapes(pred, truth)
    if truth.size == 0:
        raise ValueError("pixel_accuracy: found empty arrays. Fix: pass at least one voxel.")
    return int(np.count_nonzero(pred == truth)) / truth.size


def background_accuracy(truth: np.ndarray) -> float:
    """Accuracy of predicting background everywhere: the fraction of voxels that are 0."""
    truth = np.asarray(truth)
    if truth.size == 0:
        raise ValueError("background_accuracy: found an empty array. Fix: pass a volume.")
    return (truth.size - int(np.count_nonzero(truth))) / truth.size
