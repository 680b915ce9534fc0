"""Connected-component post-processing, decided on out-of-fold predictions (nnU-Net's way).

Two kinds of step, each on one scored region of the edition's label set (`kitsprep.labels`):

- `LARGEST`: keep the region's 3D connected components of at least `share` of the largest
  one's voxels. The kidney region (the one uniting every label) keeps components above 0.2
  of the largest, so both kidneys survive; the other regions keep their largest only.
- `INSIDE_KIDNEY`: drop the region's components (tumour, mass) that touch no kidney voxel:
  a tumour floating outside the kidney region is a false positive.

Removed voxels become background. Components are 26-connected (a face, edge or corner
touches). `decide` tries each candidate step in a fixed order and keeps it only where it
raises that region's mean Dice over the cases; kept steps apply cumulatively, in that
order, at inference (`Postprocessor`). Pure numpy (and scipy.ndimage) on label arrays.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from kitsprep.errors import KitsError
from kitsprep.labels import LabelSet, region_mask
from kitstrain.infer.engine import Spacing
from kitstrain.metrics import dice

__all__ = [
    "DECISION_VERSION",
    "INSIDE_KIDNEY",
    "KIDNEY_SHARE",
    "LARGEST",
    "Decision",
    "Postprocessor",
    "Step",
    "apply_step",
    "apply_steps",
    "candidate_steps",
    "decide",
    "drop_outside",
    "keep_large_components",
    "kidney_region",
]

DECISION_VERSION = 1
LARGEST = "largest"
INSIDE_KIDNEY = "inside_kidney"
# the kidney region keeps components of at least this share of the largest: two kidneys of
# unequal size both survive, a speck does not
KIDNEY_SHARE = 0.2
_CONNECTIVITY = np.ones((3, 3, 3), bool)


@dataclass(frozen=True)
class Step:
    """One post-processing step on the region named `region`; `share` is `LARGEST`'s."""

    kind: str
    region: str
    share: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in (LARGEST, INSIDE_KIDNEY):
            raise ValueError(
                f"Step.kind: expected {LARGEST!r} or {INSIDE_KIDNEY!r}, found {self.kind!r}"
            )
        if not 0.0 < self.share <= 1.0:
            raise ValueError(f"Step.share: expected a share in (0, 1], found {self.share}")

    def describe(self) -> str:
        """The step in words, for reports and provenance."""
        if self.kind == INSIDE_KIDNEY:
            return f"{self.region}: drop components outside the kidney"
        if self.share >= 1.0:
            return f"{self.region}: keep the largest component"
        return f"{self.region}: keep components of >= {self.share:g} of the largest"


# --------------------------------------------------------------------------- pure steps


def keep_large_components(mask: np.ndarray, share: float = 1.0) -> np.ndarray:
    """bool mask of the 3D components of `mask` holding at least `share` of the largest
    component's voxels (1.0: the largest alone, ties kept)."""
    mask = np.asarray(mask, bool)
    lab, n = ndimage.label(mask, structure=_CONNECTIVITY)
    if n <= 1:
        return mask.copy()
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    keep = sizes >= share * sizes.max()
    keep[0] = False
    return keep[lab]


def drop_outside(mask: np.ndarray, kidney: np.ndarray) -> np.ndarray:
    """bool mask of the voxels of `mask` in components that touch no voxel of `kidney`
    outside `mask`: those to remove. A component of `mask` touches such a voxel exactly when
    its component of `kidney | mask` holds one, so one labelling answers for all of them."""
    mask = np.asarray(mask, bool)
    anchor = np.asarray(kidney, bool) & ~mask
    lab, n = ndimage.label(mask | anchor, structure=_CONNECTIVITY)
    anchored = np.zeros(n + 1, bool)
    anchored[np.unique(lab[anchor])] = True
    anchored[0] = False
    return mask & ~anchored[lab]


def kidney_region(ls: LabelSet) -> int | None:
    """Index of the region uniting every label of the edition (KiTS19 kidney, KiTS21/23
    kidney_and_mass), or None."""
    every = set(ls.values)
    return next((k for k, r in enumerate(ls.regions) if set(r.labels) == every), None)


def candidate_steps(ls: LabelSet) -> tuple[Step, ...]:
    """The steps `decide` tries, in the order they apply: per region in the label set's
    order, the kidney region's `LARGEST` at `KIDNEY_SHARE`; for every other region,
    `INSIDE_KIDNEY` (where the edition has a kidney region), then `LARGEST` alone."""
    kidney = kidney_region(ls)
    steps: list[Step] = []
    for k, r in enumerate(ls.regions):
        if k == kidney:
            steps.append(Step(LARGEST, r.name, KIDNEY_SHARE))
            continue
        if kidney is not None:
            steps.append(Step(INSIDE_KIDNEY, r.name))
        steps.append(Step(LARGEST, r.name))
    return tuple(steps)


def apply_step(labels: np.ndarray, step: Step, ls: LabelSet) -> np.ndarray:
    """uint8 labels with `step` applied: the voxels it removes set to background."""
    k = ls.region_names.index(ls.region(step.region).name)
    mask = region_mask(labels, ls, k)
    if step.kind == LARGEST:
        remove = mask & ~keep_large_components(mask, step.share)
    else:
        kidney = kidney_region(ls)
        if kidney is None:
            raise KitsError(
                f"post-processing step {step.describe()!r} needs a kidney region, which "
                f"{ls.edition} lacks; record the decision again for this edition"
            )
        remove = drop_outside(mask, region_mask(labels, ls, kidney))
    out = np.array(labels, np.uint8, copy=True)
    out[remove] = 0
    return out


def apply_steps(labels: np.ndarray, steps: Sequence[Step], ls: LabelSet) -> np.ndarray:
    """`steps` applied in order, each on the previous one's labels."""
    out = np.asarray(labels, np.uint8)
    for step in steps:
        out = apply_step(out, step, ls)
    return out


# --------------------------------------------------------------------------- decision


@dataclass(frozen=True)
class Decision:
    """The steps kept for an edition, with the mean Dice per region over the `cases` they
    were decided on, before any step and after the kept ones."""

    edition: str
    steps: tuple[Step, ...]
    dice_before: dict[str, float]
    dice_after: dict[str, float]
    cases: int
    version: int = DECISION_VERSION

    def to_json(self) -> str:
        """The decision as `postprocessing.json` holds it."""
        return json.dumps(
            {
                "version": self.version,
                "edition": self.edition,
                "cases": self.cases,
                "connectivity": 26,
                "steps": [
                    {"kind": s.kind, "region": s.region, "share": s.share} for s in self.steps
                ],
                "dice_before": self.dice_before,
                "dice_after": self.dice_after,
            },
            indent=2,
        )

    def summary(self) -> str:
        """One line: the steps kept, and each region's mean Dice before and after."""
        kept = "; ".join(s.describe() for s in self.steps) or "no step raises Dice, none kept"
        dice = ", ".join(
            f"{r} {self.dice_before[r]:.4f} -> {self.dice_after.get(r, self.dice_before[r]):.4f}"
            for r in self.dice_before
        )
        return f"{kept} (mean Dice over {self.cases} cases: {dice})"

    @classmethod
    def from_json(cls, text: str) -> Decision:
        """A decision `to_json` wrote; ValueError for another version or a damaged text."""
        try:
            d = json.loads(text)
            if d.get("version") != DECISION_VERSION:
                raise ValueError(
                    f"version {d.get('version')!r}, this kitstrain reads {DECISION_VERSION}"
                )
            return cls(
                edition=str(d["edition"]),
                steps=tuple(
                    Step(str(s["kind"]), str(s["region"]), float(s["share"])) for s in d["steps"]
                ),
                dice_before={str(k): float(v) for k, v in d["dice_before"].items()},
                dice_after={str(k): float(v) for k, v in d["dice_after"].items()},
                cases=int(d["cases"]),
            )
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a post-processing decision ({exc!r})") from None


def _crop(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays cut to the box of their foreground: outside it both are background, so
    components and Dice are unchanged, and a cohort's cases fit in memory."""
    pred, truth = np.asarray(pred, np.uint8), np.asarray(truth, np.uint8)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    where = np.nonzero((pred != 0) | (truth != 0))
    if not where[0].size:
        return np.zeros((1, 1, 1), np.uint8), np.zeros((1, 1, 1), np.uint8)
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in where)
    return pred[box].copy(), truth[box].copy()


def _mean_dice(preds: Sequence[np.ndarray], truths: Sequence[np.ndarray], ls: LabelSet) -> dict:
    """Mean Dice over the cases, per region name."""
    pairs = list(zip(preds, truths, strict=True))
    return {
        r.name: float(
            np.mean([dice(region_mask(p, ls, k), region_mask(t, ls, k)) for p, t in pairs])
        )
        for k, r in enumerate(ls.regions)
    }


def decide(cases: Iterable[tuple[str, np.ndarray, np.ndarray]], ls: LabelSet) -> Decision:
    """The post-processing for `ls`'s edition decided on (case id, predicted labels, true
    labels) triples: each `candidate_steps` step is tried on top of the steps kept before it
    and kept only where it raises its region's mean Dice. Cases are held cropped to their
    foreground (`_crop`)."""
    preds, truths = [], []
    for _, pred, truth in cases:
        p, t = _crop(pred, truth)
        preds.append(p)
        truths.append(t)
    if not preds:
        raise ValueError("decide: no cases to decide post-processing on")
    before = current = _mean_dice(preds, truths, ls)
    kept: list[Step] = []
    for step in candidate_steps(ls):
        trial = [apply_step(p, step, ls) for p in preds]
        scores = _mean_dice(trial, truths, ls)
        if scores[step.region] > current[step.region]:
            preds, current = trial, scores
            kept.append(step)
    return Decision(ls.edition, tuple(kept), before, current, len(preds))


@dataclass(frozen=True)
class Postprocessor:
    """A decision's steps as `Inference.postprocess`: labels (axial axis first) and their
    spacing in, the steps applied out. Components are counted in voxels, so spacing does
    not enter."""

    steps: tuple[Step, ...]
    labels: LabelSet

    def __call__(self, labels: np.ndarray, spacing: Spacing) -> np.ndarray:
        return apply_steps(labels, self.steps, self.labels)

    def describe(self) -> list[str]:
        return [s.describe() for s in self.steps]
