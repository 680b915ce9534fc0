"""Per-case Dice and surface Dice of every scored region of a KiTS edition, plus the pixel
accuracy that hides a useless model.

Regions come from the label set (`kitsprep.labels`): KiTS19 scores kidney = labels {1, 2} and
tumour = {2}, exactly the official ``label > 0`` / ``label > 1`` of the KiTS19 starter code;
KiTS21/23 score the nested "HECs" kidney_and_mass, mass and tumor. Dice = 2|P ∩ G| / (|P| + |G|)
over the whole 3D case, never averaged over slices. Both masks empty scores 1 and one empty
scores 0, for Dice and surface Dice alike: the KiTS21/23 evaluator's convention (the KiTS19 code
divides 0 by 0 there, and a NaN would poison every mean).

Surface Dice is the official KiTS21/23 number (neheller/kits23 ``compute_metrics_for_case``,
which calls DeepMind's ``surface_distance``): the surface is made of the surfels of the 2x2x2
neighbour code of each mask, weighted by the area that code has at the voxel spacing, and
surface Dice = (gt area within tolerance of the predicted surface + predicted area within
tolerance of the gt surface) / (gt area + predicted area). The area table is DeepMind's
(``surface_distance.lookup_tables``), taken from the package rather than copied, so the areas
are the evaluator's by construction. What is ours is the speed: the volume is cut to the union
bounding box of both masks, and instead of two distance transforms over that box and a Python
sort of every surfel (the official code), each surfel only looks for a surfel of the other
surface among the few voxel offsets within the tolerance, nearest first, and stops at the first
hit. `tests/kitstrain/test_metrics.py` and `benchmarks/score.py` hold it to the package's
functions to 1e-4.

KiTS19 has no official surface Dice. Its extra column uses the KiTS21 tolerance of the region
that writes the same label (kidney ~ kidney_and_mass 1.03 mm: KiTS19's kidney includes the
masses; tumour ~ tumor 1.15 mm): those tolerances were measured as inter-annotator disagreement
on the same kind of CT, so the column is comparable across editions.

Pixel accuracy is reported next to the accuracy of predicting background everywhere, because
on KiTS the latter is already about 99 %; `CaseScore.flags` names the two ways a model fails
that comparison.

Pure numpy so that scoring needs no torch and runs anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from kitsprep.labels import EDITIONS, LabelSet, Region, region_mask

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


def _check_shapes(pred: np.ndarray, truth: np.ndarray) -> None:
    if pred.shape != truth.shape:
        raise ValueError(
            f"prediction and truth must have the same shape; found {pred.shape} and "
            f"{truth.shape}. Fix: map the prediction back to the label geometry first."
        )


def _dice_from(inter: int, n_pred: int, n_true: int) -> float:
    if n_pred + n_true == 0:
        return 1.0
    return 2.0 * inter / (n_pred + n_true)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice = 2|P ∩ G| / (|P| + |G|) of two masks of the same shape (read as ``!= 0``).
    Both empty: 1.0; one empty: 0.0."""
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


# --------------------------------------------------------------------------- surface Dice


def surface_tolerance(ls: LabelSet, region: Region) -> float:
    """The region's surface-Dice tolerance in mm; for an edition without one (KiTS19), the
    KiTS21 tolerance of the region that writes the same label (module docstring)."""
    if region.tolerance_mm is not None:
        return region.tolerance_mm
    for r in EDITIONS["kits21"].regions:
        if r.writes == region.writes:
            return float(r.tolerance_mm)
    raise ValueError(f"{ls.edition} region {region.name!r} has no surface-Dice tolerance")


def _area_table(spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    # DeepMind's own table and neighbourhood weights: imported, not copied (module docstring).
    from surface_distance import lookup_tables

    kernel = np.asarray(lookup_tables.ENCODE_NEIGHBOURHOOD_3D_KERNEL, np.uint8)
    table = lookup_tables.create_table_neighbour_code_to_surface_area(
        tuple(float(s) for s in spacing)
    )
    return kernel, np.asarray(table, np.float64)


def _neighbour_codes(mask: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """The 2x2x2 neighbour code at every voxel corner of ``mask`` (shape + 1 per axis), the
    same numbers as ``scipy.ndimage.correlate(crop, kernel, mode="constant")`` on DeepMind's
    crop: corner g sees voxels g-1 and g on each axis, outside the mask counts as empty."""
    padded = np.zeros(tuple(n + 2 for n in mask.shape), np.uint8)
    padded[1:-1, 1:-1, 1:-1] = mask
    n0, n1, n2 = (n + 1 for n in mask.shape)
    code = np.zeros((n0, n1, n2), np.uint8)
    for a in (0, 1):
        for b in (0, 1):
            for c in (0, 1):
                code |= padded[a : a + n0, b : b + n1, c : c + n2] * kernel[a, b, c]
    return code


def _tolerance_offsets(spacing: np.ndarray, tol: float) -> np.ndarray:
    """Integer voxel offsets whose length in mm is within ``tol``, nearest first."""
    r = np.floor(tol / spacing).astype(int)
    grid = np.stack(np.meshgrid(*(np.arange(-k, k + 1) for k in r), indexing="ij"), -1)
    grid = grid.reshape(-1, 3)
    # The length as the distance transform computes it: sqrt of the sum of squares in mm.
    dist = np.sqrt(((grid * spacing) ** 2).sum(axis=1))
    keep = dist <= tol
    return grid[keep][np.argsort(dist[keep], kind="stable")]


def _within(points: np.ndarray, other: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """For each flat index in ``points`` (into the padded grid behind ``other``), whether a
    True of ``other`` lies at one of ``offsets`` from it. Points stop looking at the first
    hit, so a good prediction costs about one look per surfel."""
    hit = np.zeros(points.shape, bool)
    todo = np.arange(points.size)
    strides = np.array(other.strides) // other.itemsize
    flat = other.reshape(-1)
    for off in offsets:
        found = flat[points[todo] + int(off @ strides)]
        hit[todo[found]] = True
        todo = todo[~found]
        if todo.size == 0:
            break
    return hit


def surface_dice(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], tolerance_mm: float
) -> float:
    """Surface Dice of two 3D masks at ``tolerance_mm``, with the voxel ``spacing`` in mm per
    axis of the arrays: the official KiTS21/23 number (module docstring). Both empty: 1.0;
    one empty: 0.0."""
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    _check_shapes(p, t)
    if p.ndim != 3 or len(spacing) != 3:
        raise ValueError(
            f"surface_dice: expected 3D masks and 3 spacings; found shape "
            f"{p.shape} and spacing {tuple(spacing)}"
        )
    box_p, box_t = _box(p), _box(t)
    if box_p is None and box_t is None:
        return 1.0
    if box_p is None or box_t is None:
        return 0.0
    box = tuple(
        slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(box_p, box_t, strict=True)
    )
    p, t = p[box], t[box]
    sp = np.asarray(spacing, np.float64)
    kernel, table = _area_table(tuple(sp))
    offsets = _tolerance_offsets(sp, float(tolerance_mm))
    margin = np.abs(offsets).max(axis=0) if offsets.size else np.zeros(3, int)

    def surfels(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        code = _neighbour_codes(mask, kernel)
        border = (code != 0) & (code != 255)
        # the border on a grid padded by the offsets' reach, so every look stays inside
        grid = np.zeros(tuple(n + 2 * m for n, m in zip(code.shape, margin, strict=True)), bool)
        grid[tuple(slice(m, m + n) for n, m in zip(code.shape, margin, strict=True))] = border
        idx = np.flatnonzero(grid)
        return grid, idx, table[code[border]]

    # np.flatnonzero on the padded grid and boolean indexing of the code share C order, so
    # surfel i of `idx` has area `area[i]`.
    grid_t, idx_t, area_t = surfels(t)
    grid_p, idx_p, area_p = surfels(p)
    near_t = _within(idx_t, grid_p, offsets)
    near_p = _within(idx_p, grid_t, offsets)
    total = area_t.sum() + area_p.sum()
    return float((area_t[near_t].sum() + area_p[near_p].sum()) / total)


def _box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of the nonzero voxels, None when there are none. One pass over the whole
    array (first axis), the others only over the slab that has any."""
    m = np.asarray(mask)
    if m.ndim == 0 or m.size == 0:
        return None
    if m.flags.f_contiguous and not m.flags.c_contiguous:
        # NIfTI volumes come in Fortran order: walk the transpose, which is C order
        box = _box(m.T)
        return None if box is None else box[::-1]
    first = np.flatnonzero(m.reshape(m.shape[0], -1).any(axis=1))
    if first.size == 0:
        return None
    box = [slice(int(first[0]), int(first[-1]) + 1)]
    if m.ndim > 1:
        plane = m[box[0]].any(axis=0)
        for axis in range(plane.ndim):
            others = tuple(a for a in range(plane.ndim) if a != axis)
            nz = np.flatnonzero(plane.any(axis=others) if others else plane)
            box.append(slice(int(nz[0]), int(nz[-1]) + 1))
    return tuple(box)


def foreground_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of a mask's True voxels as slices (the whole array when empty):
    every region of KiTS is inside the box of ``labels != 0``, so metrics run on that box."""
    box = _box(mask)
    return box if box is not None else tuple(slice(0, n) for n in np.shape(mask))


# --------------------------------------------------------------------------- counts


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
        _check_shapes(pred_labels, true_labels)
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
            r.name: _dice_from(int(c.inter[k]), int(c.pred[k]), int(c.true[k]))
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
    _check_shapes(pred_labels, true_labels)
    if true_labels.size == 0:
        raise ValueError(f"score_case: case {case!r} has no voxels. Fix: pass a volume.")
    # Everything is counted inside the union box of both foregrounds: outside it both are
    # background, so they agree. Each volume is walked once in its own memory order (a
    # NIfTI mask is Fortran order, a prediction often C order: mixing them is slow).
    box_p, box_t = _box(pred_labels), _box(true_labels)
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
