"""Per-case Dice and surface Dice of every scored region of a KiTS edition, plus the pixel
accuracy that hides a useless model.

Regions come from the label set (`kitsprep.labels`): KiTS19 scores kidney = labels {1, 2} and
tumour = {2}, exactly the official ``label > 0`` / ``label > 1`` of the KiTS19 starter code;
KiTS21/23 score the nested "HECs" kidney_and_mass, mass and tumor. Dice = 2|P ∩ G| / (|P| + |G|)
over the whole 3D case, never averaged over slices. Both masks empty scores 1 and one empty
scores 0, for Dice and surface Dice alike: the KiTS21/23 evaluator's convention (the KiTS19 code
divides 0 by 0 there, and a NaN would poison every mean).

Pixel accuracy is reported next to the accuracy of predicting background everywhere, because
on KiTS the latter is already about 99 %; `CaseScore.flags` names the two ways a model fails
that comparison.

Pure numpy so that scoring needs no torch and runs anywhere.

Modules: `overlap` (Dice, accuracies), `surface` (surface Dice), `scores` (a case's
scores, their counts and mean).
"""

from __future__ import annotations

from kitstrain.metrics.overlap import (
    BACKGROUND_FLAG,
    MIN_FOREGROUND_SHARE,
    OVERPREDICT_FLAG,
    OVERPREDICT_MARGIN,
    background_accuracy,
    dice,
    pixel_accuracy,
)
from kitstrain.metrics.scores import (
    CaseScore,
    DiceCounts,
    mean_score,
    score_case,
    score_from_counts,
)
from kitstrain.metrics.surface import foreground_box, surface_dice, surface_tolerance

__all__ = [
    "BACKGROUND_FLAG",
    "MIN_FOREGROUND_SHARE",
    "OVERPREDICT_FLAG",
    "OVERPREDICT_MARGIN",
    "CaseScore",
    "DiceCounts",
    "background_accuracy",
    "dice",
    "foreground_box",
    "mean_score",
    "pixel_accuracy",
    "score_case",
    "score_from_counts",
    "surface_dice",
    "surface_tolerance",
]
