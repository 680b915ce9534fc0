"""Kidneys: the bean-shaped label 1 beside the spine (with its renal pelvis), and their
tissue: an enhanced cortex around a darker medulla, urine in the pelvis."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from kitsprep.synth.layout import Layout
from kitsprep.synth.shapes import Box, ellipsoid, erode2d, fill
from kitsprep.synth.tissues import CORTEX, MEDULLA, PELVIS

# The renal pelvis of each kidney: its bounding box and mask (painted as urine).
Pelvis = Sequence[tuple[Box, np.ndarray]]


@dataclass(frozen=True)
class Kidney:
    """One drawn kidney's ellipsoid: tumours grow from its surface."""

    side: int  # -1: patient right (low columns), 1: left
    centre: tuple[float, float, float]  # (z, y, x) voxels
    radii: tuple[float, float, float]
    theta: float  # in-plane rotation (radians)
    drift: tuple[float, float]  # (dy, dx) px from the centre to the inferior pole


def draw_kidneys(
    layout: Layout, rng: np.random.Generator
) -> tuple[np.ndarray, list[tuple[Box, np.ndarray]], list[Kidney]]:
    """Two bean-shaped kidneys beside the spine: the label volume (1 = kidney), the
    renal-pelvis regions (for painting) and the kidneys drawn (for tumours to grow from)."""
    shape, ez, pe = layout.shape, layout.ez, layout.pe
    slices = shape[0]
    seg = np.zeros(shape, np.uint8)
    pelvis: list[tuple[Box, np.ndarray]] = []
    kidneys: list[Kidney] = []
    z_left = slices * rng.uniform(0.42, 0.54)
    z_right = z_left + slices * rng.uniform(0.0, 0.06)  # the liver pushes the right one down
    for side, zc in ((-1, z_right), (1, z_left)):
        rz = rng.uniform(48, 62) / ez
        ry = rng.uniform(17, 24) / pe
        rx = rng.uniform(24, 32) / pe
        yc = layout.spine_y + layout.rv * rng.uniform(-0.6, 0.2)
        xc = layout.spine_x + side * (layout.rv + rx + rng.uniform(8, 22) / pe)
        # Hilum faces antero-medially: rotate so the medial pole points forward.
        theta = side * math.radians(rng.uniform(15, 35))
        drift = (-rng.uniform(3, 10) / pe, side * rng.uniform(3, 10) / pe)
        # At tiny sizes a kidney must still be a few voxels, not vanish between samples.
        rz, ry, rx = max(rz, 1.0), max(ry, 1.5), max(rx, 1.5)
        blob = ellipsoid(shape, (zc, yc, xc), (rz, ry, rx), theta, drift)
        if blob is None:
            continue
        medial = -side * blob.u  # +1 at the medial pole
        # Bean shape: a rounded notch (renal sinus, left as fat) cut into the medial side,
        # with the renal pelvis (urine, labelled kidney) filling its inner part.
        hilum = ((medial - 1.0) / 0.5) ** 2 + (blob.v / 0.45) ** 2 + (blob.t / 0.55) ** 2 <= 1
        basin = ((medial - 0.5) / 0.4) ** 2 + (blob.v / 0.25) ** 2 + (blob.t / 0.35) ** 2 <= 1
        kid = blob.mask & (~hilum | basin)
        fill(seg, blob.box, kid, 1)
        pelvis.append((blob.box, blob.mask & basin))
        kidneys.append(Kidney(side, (zc, yc, xc), (rz, ry, rx), theta, drift))
    return seg, pelvis, kidneys


def place_kidneys(seg: np.ndarray, layout: Layout, kidneys: Sequence[Kidney]) -> Layout:
    """The layout completed with the kidneys' slice range and centres. Keeps one kidney
    voxel where a tumour swallowed them all (tiny sizes): every labelled case has a kidney."""
    if not (seg == 1).any():
        z, y, x = (
            min(max(round(c), 0), n - 1) for c, n in zip(kidneys[0].centre, seg.shape, strict=True)
        )
        seg[z, y, x] = 1
    spots = tuple((k.centre[0], k.centre[1], k.centre[2], k.side) for k in kidneys)
    z_lo = max(0.0, min(k.centre[0] - k.radii[0] for k in kidneys))
    z_hi = min(float(layout.shape[0]), max(k.centre[0] + k.radii[0] for k in kidneys))
    return replace(layout, kz_lo=z_lo, kz_hi=z_hi, kidneys=spots)


def draw_cortex_px(rng: np.random.Generator, pe: float) -> int:
    """The cortex's thickness in pixels (4-6 mm)."""
    return max(1, round(rng.uniform(4, 6) / pe))


def renal_box(seg: np.ndarray) -> Box | None:
    """The bounding box of the mask's foreground, one pixel wider in-plane; None if empty."""
    zs = np.flatnonzero(seg.max(axis=(1, 2)))
    if zs.size == 0:
        return None
    z0, z1 = int(zs[0]), int(zs[-1]) + 1
    part = seg[z0:z1]
    ys = np.flatnonzero(part.max(axis=(0, 2)))
    xs = np.flatnonzero(part.max(axis=(0, 1)))
    y0, y1 = max(0, int(ys[0]) - 1), min(seg.shape[1], int(ys[-1]) + 2)
    x0, x1 = max(0, int(xs[0]) - 1), min(seg.shape[2], int(xs[-1]) + 2)
    return (slice(z0, z1), slice(y0, y1), slice(x0, x1))


def paint_kidneys(
    cls: np.ndarray, seg: np.ndarray, box: Box, cortex_px: int, pelvis: Pelvis
) -> None:
    """Label 1 becomes cortex within ``cortex_px`` of the foreground's outline (tumours and
    cysts included), medulla deeper in, and urine in the renal pelvis."""
    s = seg[box]
    kid = s == 1
    inner = erode2d(s > 0, cortex_px)
    sub = cls[box]
    sub[kid & ~inner] = CORTEX
    sub[kid & inner] = MEDULLA
    for pbox, pmask in pelvis:
        fill(cls, pbox, pmask & (seg[pbox] == 1), PELVIS)
