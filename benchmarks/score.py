"""Surface Dice: ours (`kitstrain.metrics.surface_dice`) against the official evaluator's
code (DeepMind's `surface_distance`, as neheller/kits23's `compute_metrics_for_case` calls
it: whole volume, spacing from the header), on the same masks, region by region.

    python benchmarks/score.py [--masks DIR] [--cases 0-49] [--perturb shift erode dilate]

The truth is each real KiTS23 mask in ../shared/kits23-masks (found from the repository
root; a synthetic case when absent); the prediction is a perturbed copy (shifted, eroded or
dilated, cycling per case). Prints the time per region of both (surface Dice from the same
boolean masks) and their ratio, then per case the whole scoring as a user meets it: ours
`score_case` (Dice and surface Dice of the three regions, accuracy) against the evaluator's
`compute_metrics_for_case` steps (region masks from the full label volume, Dice, surface Dice).
Exits 1 unless every surface Dice agrees to 1e-4. Timings are single-threaded numpy/scipy;
take them on a quiet machine.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from kitsprep.cases import parse_case_spec
from kitsprep.labels import EDITIONS
from kitstrain.metrics import dice, foreground_box, score_case, surface_dice, surface_tolerance

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MASKS = ROOT.parent / "shared" / "kits23-masks"
TOLERANCE = 1e-4


def official(pred: np.ndarray, truth: np.ndarray, spacing: tuple, tol: float) -> float:
    """`kits23.evaluation.metrics.compute_metrics_for_label`'s surface Dice branch."""
    import surface_distance

    if not truth.any() and not pred.any():
        return 1.0
    if not truth.any() or not pred.any():
        return 0.0
    with warnings.catch_warnings():  # its scipy.ndimage.filters import path is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        dist = surface_distance.compute_surface_distances(truth, pred, spacing)
    return float(surface_distance.compute_surface_dice_at_tolerance(dist, tolerance_mm=tol))


def official_case(pred: np.ndarray, truth: np.ndarray, spacing: tuple, ls) -> list[float]:
    """`compute_metrics_for_case` after reading the files: per region, masks built from the
    whole label volumes, Dice, surface Dice."""
    out = []
    for r in ls.regions:
        p, t = np.isin(pred, r.labels), np.isin(truth, r.labels)
        out += [dice(p, t), official(p, t, spacing, surface_tolerance(ls, r))]
    return out


def perturb(labels: np.ndarray, how: str) -> np.ndarray:
    """A plausible wrong prediction: the truth shifted by a few voxels, or its foreground
    eroded / grown by one voxel (computed in the foreground's box, for speed)."""
    if how == "shift":
        return np.roll(labels, (1, 2, -1), axis=(0, 1, 2))
    box = tuple(slice(max(s.start - 2, 0), s.stop + 2) for s in foreground_box(labels != 0))
    out = labels.copy()
    sub = labels[box]
    if how == "erode":
        out[box] = np.where(ndimage.binary_erosion(sub != 0), sub, 0)
    else:
        out[box] = ndimage.grey_dilation(sub, size=(3, 3, 3))
    return out


def synthetic() -> tuple[str, np.ndarray, tuple[float, float, float]]:
    """A 120x256x256 volume with two kidneys, a tumour and a cyst, 2.5 x 0.8 x 0.8 mm."""
    z, y, x = np.ogrid[:120, :256, :256]
    labels = np.zeros((120, 256, 256), np.uint8)
    for cy, cx in ((128, 70), (128, 186)):
        labels[((z - 60) / 25.0) ** 2 + ((y - cy) / 40.0) ** 2 + ((x - cx) / 25.0) ** 2 < 1] = 1
    labels[((z - 55) / 6.0) ** 2 + ((y - 110) / 15.0) ** 2 + ((x - 80) / 12.0) ** 2 < 1] = 2
    labels[((z - 70) / 4.0) ** 2 + ((y - 140) / 8.0) ** 2 + ((x - 190) / 8.0) ** 2 < 1] = 3
    return "synthetic", labels, (2.5, 0.8, 0.8)


def real_cases(folder: Path, spec: str | None):
    ids = sorted(p.name for p in folder.glob("case_*") if (p / "segmentation.nii.gz").is_file())
    for cid in parse_case_spec(spec, ids) if spec else ids:
        img = nib.load(str(folder / cid / "segmentation.nii.gz"))
        yield (
            cid,
            np.asarray(img.dataobj, np.uint8),
            tuple(float(z) for z in img.header.get_zooms()[:3]),
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--masks",
        type=Path,
        default=DEFAULT_MASKS,
        help="case_XXXXX/segmentation.nii.gz folders [../shared/kits23-masks]",
    )
    ap.add_argument("--cases", default=None, help="case spec, e.g. 0-4 or case_00020")
    ap.add_argument(
        "--perturb",
        nargs="+",
        default=["shift", "erode", "dilate"],
        choices=["shift", "erode", "dilate"],
    )
    args = ap.parse_args(argv)
    ls = EDITIONS["kits23"]
    cases = real_cases(args.masks, args.cases) if args.masks.is_dir() else [synthetic()]
    if not args.masks.is_dir():
        print(f"{args.masks} not found: one synthetic case instead")
    print(
        f"{'case':<11} {'perturb':<7} {'region':<16} {'ours s':>8} {'official s':>10} "
        f"{'ratio':>7} {'surface Dice':>12} {'|diff|':>8}"
    )
    t_ours = t_ref = c_ours = c_ref = 0.0
    worst = 0.0
    for i, (cid, truth, spacing) in enumerate(cases):
        how = args.perturb[i % len(args.perturb)]
        pred = perturb(truth, how)
        for r in ls.regions:
            tol = surface_tolerance(ls, r)
            p, t = np.isin(pred, r.labels), np.isin(truth, r.labels)
            t0 = time.perf_counter()
            ours = surface_dice(p, t, spacing, tol)
            t1 = time.perf_counter()
            ref = official(p, t, spacing, tol)
            t2 = time.perf_counter()
            t_ours += t1 - t0
            t_ref += t2 - t1
            worst = max(worst, abs(ours - ref))
            print(
                f"{cid:<11} {how:<7} {r.name:<16} {t1 - t0:8.3f} {t2 - t1:10.3f} "
                f"{(t2 - t1) / max(t1 - t0, 1e-9):7.1f} {ours:12.6f} {abs(ours - ref):8.1e}",
                flush=True,
            )
        t0 = time.perf_counter()
        s = score_case(cid, pred, truth, ls, spacing)
        t1 = time.perf_counter()
        ref = official_case(pred, truth, spacing, ls)
        t2 = time.perf_counter()
        c_ours += t1 - t0
        c_ref += t2 - t1
        ours = [v for r in ls.regions for v in (s.dice[r.name], s.surface_dice[r.name])]
        worst = max(worst, float(np.abs(np.subtract(ours, ref)).max()))
        print(
            f"{cid:<11} {how:<7} {'whole case':<16} {t1 - t0:8.3f} {t2 - t1:10.3f} "
            f"{(t2 - t1) / max(t1 - t0, 1e-9):7.1f}",
            flush=True,
        )
    print(
        f"surface Dice per region: ours {t_ours:.2f} s, official {t_ref:.2f} s, ratio "
        f"{t_ref / max(t_ours, 1e-9):.1f}x"
    )
    print(
        f"whole cases: ours {c_ours:.2f} s, official {c_ref:.2f} s, ratio "
        f"{c_ref / max(c_ours, 1e-9):.1f}x; largest difference {worst:.1e}"
    )
    if worst > TOLERANCE:
        print(f"FAIL: surface Dice differs from the official code by {worst:.1e} > {TOLERANCE}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
