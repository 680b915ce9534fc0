"""A case's geometry: where the body, spine and kidneys are, in voxel units of one volume.

Drawn at random for a synthetic case (`draw_body`, completed by `kidney.draw_kidneys`), or
fitted around the kidneys of a given mask (`layout_from_mask`). Every painter reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class Layout:
    """Where the body, spine and kidneys are, in voxel units of one volume.

    ``ez``/``pe`` are the millimetres per slice / pixel the anatomy is drawn at. For a real mask
    they are its spacing; for a synthetic case they are chosen so that a fixed-size body fills
    the same share of the field of view at every ``size`` and a kidney spans about a third of
    the slices, independently of the slice thickness written into the header.
    """

    shape: tuple[int, int, int]
    ez: float
    pe: float
    cy: float  # body ellipse centre and half-axes (px)
    cx: float
    a: float  # lateral half-width
    b: float  # anterior-posterior half-depth
    fat: float  # subcutaneous fat thickness (px)
    wall: float  # muscle wall thickness (px)
    spine_y: float  # vertebral body centre and radius (px)
    spine_x: float
    rv: float
    kz_lo: float = 0.0  # slice range holding kidney
    kz_hi: float = 0.0
    kidneys: tuple[tuple[float, float, float, int], ...] = ()  # (z, y, x, side); side -1 = right

    @property
    def kidney_span(self) -> float:
        """Slices the kidneys span (at least one): organs are placed in units of it."""
        return max(self.kz_hi - self.kz_lo, 1.0)


def body_rho(layout: Layout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised body coordinates (X, Y) of every in-plane pixel, and the body 'radius'.

    The posterior half is a flatter superellipse: a patient lies on the table.
    """
    _, rows, cols = layout.shape
    y = (np.arange(rows, dtype=np.float32)[:, None] - layout.cy) / layout.b
    x = (np.arange(cols, dtype=np.float32)[None, :] - layout.cx) / layout.a
    p = np.where(y > 0, np.float32(2.8), np.float32(2.0))
    rho = (np.abs(x) ** p + np.abs(y) ** p) ** (1.0 / p)
    return np.broadcast_to(x, rho.shape), np.broadcast_to(y, rho.shape), rho


def inner_body(layout: Layout) -> np.ndarray:
    """In-plane pixels where a tumour or cyst may grow: inside the muscle wall, not in the
    spine."""
    _, _, rho = body_rho(layout)
    inner = rho < 1.0 - (layout.fat + layout.wall) / max(layout.a, layout.b)
    _, rows, cols = layout.shape
    yy = np.arange(rows)[:, None] - layout.spine_y
    xx = np.arange(cols)[None, :] - layout.spine_x
    return inner & (yy * yy + xx * xx > (1.1 * layout.rv) ** 2)


def draw_body(
    shape: tuple[int, int, int], ez: float, pe: float, rng: np.random.Generator
) -> Layout:
    """Random body outline and spine for a synthetic case."""
    _, rows, cols = shape
    a = min(rng.uniform(150, 185) / pe, 0.47 * cols)
    b = min(a * rng.uniform(0.66, 0.8), 0.45 * rows)
    cy = rows / 2 + rng.uniform(-0.01, 0.04) * rows
    cx = cols / 2 + rng.uniform(-0.02, 0.02) * cols
    fat = rng.uniform(8, 35) / pe
    wall = rng.uniform(6, 14) / pe
    rv = min(rng.uniform(15, 20) / pe, 0.15 * b)
    # Vertebral body centre ~65-85 mm in front of the skin of the back.
    spine_y = max(cy + b - rng.uniform(65, 85) / pe, cy + 0.2 * b)
    return Layout(
        shape=shape, ez=float(ez), pe=float(pe), cy=cy, cx=cx, a=a, b=b, fat=fat, wall=wall,
        spine_y=spine_y, spine_x=cx, rv=rv,
    )  # fmt: skip


def layout_from_mask(
    seg: np.ndarray, spacing: tuple[float, float, float], rng: np.random.Generator
) -> Layout:
    """Place body and spine around the kidneys of a given mask (real or hand-made)."""
    shape = tuple(int(n) for n in seg.shape)
    slices, rows, cols = shape
    ez, pe = float(spacing[0]), float(spacing[1])
    fg = seg > 0
    zs = np.flatnonzero(fg.any(axis=(1, 2)))
    if zs.size == 0:  # nothing to place around: kidney level in the middle third
        body = draw_body(shape, ez, pe, rng)
        return replace(body, kz_lo=slices / 3, kz_hi=2 * slices / 3)
    z, y, x = np.nonzero(fg[zs[0] : zs[-1] + 1])
    z = z + zs[0]
    right = x < cols / 2
    groups = [g for g in (right, ~right) if g.any()]
    spots = tuple(
        (float(z[g].mean()), float(y[g].mean()), float(x[g].mean()), -1 if g is right else 1)
        for g in groups
    )
    spine_x = float(np.mean([s[2] for s in spots])) if len(spots) == 2 else cols / 2
    reach_x = float(np.abs(x - spine_x).max())
    a = max(rng.uniform(150, 185) / pe, reach_x * 1.25)
    a = min(a, 0.99 * min(spine_x, cols - spine_x))
    b = a * rng.uniform(0.66, 0.8)
    rv = min(rng.uniform(15, 20) / pe, 0.15 * b)
    spine_y = float(y.mean()) + 0.4 * rv
    # The back's skin ~65-85 mm behind the vertebral body, as in the synthetic cases, but
    # kept inside the field of view and behind the kidneys even for odd hand-made masks.
    back = min(spine_y + rng.uniform(65, 85) / pe, 0.99 * rows)
    back = min(max(back, spine_y + 2.6 * rv, float(y.max()) + 3), rows - 1.0)
    b = float(max(min(b, (back - 0.01 * rows) / 2), 1.0))
    cy = back - b
    thin = min(a, b)
    fat = min(rng.uniform(8, 35) / pe, 0.12 * thin)
    wall = min(rng.uniform(6, 14) / pe, 0.06 * thin)
    return Layout(
        shape=shape, ez=ez, pe=pe, cy=cy, cx=spine_x, a=a, b=b, fat=fat, wall=wall,
        spine_y=spine_y, spine_x=spine_x, rv=rv,
        kz_lo=float(zs[0]), kz_hi=float(zs[-1] + 1), kidneys=spots,
    )  # fmt: skip
