"""Bone: vertebrae (cancellous body, cortical rim, arch, processes) alternating with discs,
and rib cross-sections in the wall of the upper slices."""

from __future__ import annotations

import math

import numpy as np

from kitsprep.synth.body import layer_shares
from kitsprep.synth.layout import Layout, body_rho
from kitsprep.synth.tissues import BONE, CAVITY, CORTICAL, CSF, DISC, FAT, LIVER, MUSCLE, SPLEEN


def paint_spine(cls: np.ndarray, layout: Layout, rng: np.random.Generator) -> None:
    """Vertebrae (cancellous body, cortical rim, arch, processes) alternating with discs."""
    slices, rows, cols = layout.shape
    sy, sx, rv, pe = layout.spine_y, layout.spine_x, layout.rv, layout.pe
    y0, y1 = max(0, math.floor(sy - 1.2 * rv)), min(rows, math.ceil(sy + 3.6 * rv) + 1)
    x0, x1 = max(0, math.floor(sx - 2.4 * rv)), min(cols, math.ceil(sx + 2.4 * rv) + 1)
    if y1 <= y0 or x1 <= x0:
        return
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - sy
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - sx
    r_body = np.hypot(dy, dx)
    body = r_body <= rv
    rim = body & (r_body > rv - max(2.0 / pe, 0.7))
    dc = np.hypot(dy - 1.45 * rv, dx)
    canal = dc <= 0.5 * rv
    arch = (dc > 0.5 * rv) & (dc <= 0.85 * rv) & (dy > 1.2 * rv)
    spinous = ((dy - 2.6 * rv) / (0.8 * rv)) ** 2 + (dx / (0.25 * rv)) ** 2 <= 1
    trans = ((dy - 1.2 * rv) / (0.25 * rv)) ** 2 + ((np.abs(dx) - 1.5 * rv) / (0.7 * rv)) ** 2 <= 1

    period = rng.uniform(28, 36) / layout.ez  # vertebral height in slices
    phase = rng.uniform(0, 1)
    is_disc = ((np.arange(slices) / period + phase) % 1.0) < 0.18
    bone_slice = np.select(
        [canal, rim | arch, body | spinous | trans], [CSF, CORTICAL, BONE], 255
    ).astype(np.uint8)
    disc_slice = np.select([canal, body], [CSF, DISC], 255).astype(np.uint8)
    sub = cls[:, y0:y1, x0:x1]
    for sel, pattern in ((~is_disc, bone_slice), (is_disc, disc_slice)):
        if sel.any():
            part = sub[sel]
            sub[sel] = np.where(pattern == 255, part, pattern)


def paint_ribs(cls: np.ndarray, layout: Layout, rng: np.random.Generator) -> None:
    """Rib cross-sections in the wall of the upper slices (down to the upper kidney poles),
    placed at angles that rotate with z as oblique ribs do."""
    lk = layout.kidney_span
    z_end = min(layout.shape[0], math.ceil(layout.kz_lo + rng.uniform(0.1, 0.4) * lk))
    n_ribs = int(rng.integers(8, 13))
    phase = rng.uniform(0, 2 * np.pi)
    omega = 2 * np.pi / rng.uniform(40, 70) * layout.ez  # radians per slice
    half = max(3.5 / layout.pe, 0.6) / ((layout.a + layout.b) / 2)
    x, y, rho = body_rho(layout)
    fat_r, wall_r = layer_shares(layout)
    ring = (np.abs(rho - (1.0 - fat_r - 0.5 * wall_r)) < half) & (np.abs(x) > 0.25)
    iy, ix = np.nonzero(ring)
    if z_end <= 0 or iy.size == 0:
        return
    ang = np.arctan2(y[iy, ix], x[iy, ix])
    zz = np.arange(z_end, dtype=np.float32)[:, None]
    on = np.sin(n_ribs * ang[None, :] + phase + omega * zz) > 0.75
    sub = cls[:z_end, iy, ix]
    ok = on & np.isin(sub, (MUSCLE, FAT, CAVITY, LIVER, SPLEEN))
    cls[:z_end, iy, ix] = np.where(ok, np.uint8(BONE), sub)
