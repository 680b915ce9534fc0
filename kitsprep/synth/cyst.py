"""Renal cysts (KiTS21/23 label 3): round, on or in a kidney, water-dense and homogeneous,
unlike a tumour."""

from __future__ import annotations

import math

import numpy as np

from kitsprep.synth.layout import Layout, inner_body
from kitsprep.synth.shapes import Box, ellipsoid, erode2d, fill
from kitsprep.synth.tissues import CYST

# What the labelled cases of a kits23 cohort hold, by case index: variety in any small cohort.
CYST_KINDS = ("cysts", "cyst_beside_tumour", "cysts_only", "no_cyst")


def _cyst_sites(
    k: int, kidney: np.ndarray, tumour: np.ndarray, beside_tumour: bool, rng: np.random.Generator
) -> np.ndarray:
    """Where cyst ``k`` may be centred: the tumour's surface (the first, ``beside_tumour``),
    else the kidney's surface (an exophytic cyst) or anywhere in the kidney."""
    if k == 0 and beside_tumour and tumour.any():
        return tumour & ~erode2d(tumour, 1)
    if rng.random() < 0.6:
        return kidney & ~erode2d(kidney, 1)
    return kidney


def grow_cysts(
    seg: np.ndarray, layout: Layout, rng: np.random.Generator, beside_tumour: bool
) -> None:
    """Label 3: one to three round cysts of 5-25 mm radius centred on a kidney voxel (on its
    surface, bulging out, or inside it); with ``beside_tumour`` the first sits on the
    tumour's surface. Cysts never overwrite tumour, as KiTS writes tumour over cyst."""
    ez, pe = layout.ez, layout.pe
    inside = inner_body(layout)
    kidney = seg == 1
    tumour = seg == 2
    painted = False
    for k in range(int(rng.integers(1, 4))):
        spots = np.argwhere(_cyst_sites(k, kidney, tumour, beside_tumour, rng))
        if len(spots) == 0:
            continue
        centre = tuple(float(v) for v in spots[int(rng.integers(len(spots)))])
        r_mm = float(np.exp(rng.uniform(math.log(5), math.log(25))))
        blob = ellipsoid(
            seg.shape, centre, (max(r_mm / ez, 0.5), max(r_mm / pe, 1.0), max(r_mm / pe, 1.0))
        )
        if blob is None:
            continue
        m = blob.mask & inside[blob.box[1:]] & ~tumour[blob.box]
        fill(seg, blob.box, m, 3)
        painted = painted or bool(m.any())
    spots = np.argwhere(seg == 1)
    if not painted and len(spots):  # clipped away at tiny sizes: a cyst case keeps a cyst
        seg[tuple(spots[len(spots) // 2])] = 3


def paint_cysts(cls: np.ndarray, seg: np.ndarray, box: Box) -> None:
    """Label 3 (and any higher value a real mask may hold) becomes cyst tissue."""
    cls[box][seg[box] >= 3] = CYST


def cyst_look(rng: np.random.Generator) -> tuple[float, float]:
    """Mean HU and texture amplitude of a renal cyst: near-water density (0-20 HU) and
    homogeneous (a texture of a few HU, below the scan's noise), unlike a tumour."""
    return float(rng.uniform(0, 20)), float(rng.uniform(1, 3))
