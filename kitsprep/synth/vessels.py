"""Vessels: the aorta (left-anterior of the spine) splitting into the iliacs below the
kidneys, the IVC on the right, and the renal veins from each kidney's hilum to the IVC.
Enhanced blood is brighter than kidney cortex or close to it."""

from __future__ import annotations

import math

import numpy as np

from kitsprep.synth.layout import Layout
from kitsprep.synth.shapes import along, fill, tube
from kitsprep.synth.tissues import AIR, ARTERY, BONE, CORTICAL, FAT, MUSCLE, N_CLASSES, SOFT, VEIN

# Vessels run through everything soft, the intrahepatic IVC included.
VESSEL_OK = tuple(k for k in range(N_CLASSES) if k not in (AIR, FAT, BONE, CORTICAL))


def paint_vessels(cls: np.ndarray, layout: Layout, rng: np.random.Generator) -> None:
    """Great vessels, then the renal veins that join the IVC."""
    ivc = paint_great_vessels(cls, layout, rng)
    paint_renal_veins(cls, layout, rng, ivc)


def paint_great_vessels(
    cls: np.ndarray, layout: Layout, rng: np.random.Generator
) -> tuple[float, float]:
    """Aorta and IVC down to the bifurcation, the iliac arteries and veins below it, drifting
    apart. Returns the IVC's centre (row, column)."""
    u = rng.uniform
    shape, slices, pe = layout.shape, layout.shape[0], layout.pe
    sy, sx, rv, lk = layout.spine_y, layout.spine_x, layout.rv, layout.kidney_span
    r_ao = u(9, 13) / pe
    r_iv = u(9, 13) / pe
    ya, xa = sy - rv - 1.15 * r_ao, sx + 0.35 * rv
    yv, xv = sy - rv - 0.7 * r_iv, sx - 1.4 * rv - 0.3 * r_iv
    z_bif = min(float(slices), layout.kz_hi + u(0.1, 0.5) * lk)
    spread = u(0.25, 0.4) / pe * layout.ez  # px of lateral drift per slice after the bifurcation
    zs = along(slices, 0, z_bif)
    for yc, xc, r, kind in ((ya, xa, r_ao, ARTERY), (yv, xv, r_iv, VEIN)):
        st = tube(shape, zs, yc, xc, r * 0.9, r * 1.1)
        if st:
            fill(cls, *st, kind, VESSEL_OK)
    zs = along(slices, z_bif, slices)
    if zs.size:
        d = (zs - z_bif) * spread
        for side in (-1, 1):
            for yc, xc, r, kind in ((ya, xa, r_ao, ARTERY), (yv + r_iv, (xa + xv) / 2, r_iv, VEIN)):
                gap = side * (d + (r_iv if kind == VEIN else 0.3 * r_ao))
                st = tube(shape, zs, yc + 0.1 * d, xc + gap, 0.65 * r, 0.65 * r)
                if st:
                    fill(cls, *st, kind, VESSEL_OK)
    return yv, xv


def paint_renal_veins(
    cls: np.ndarray, layout: Layout, rng: np.random.Generator, ivc: tuple[float, float]
) -> None:
    """A straight vein from each kidney's centre to the IVC, a few millimetres thick and
    3-6 mm above and below the kidney's centre slice."""
    u = rng.uniform
    shape, slices = layout.shape, layout.shape[0]
    yv, xv = ivc
    r_rv = max(u(3.5, 6) / layout.pe, 0.8)
    for kz, ky, kx, _side in layout.kidneys:
        half = max(0, round(u(3, 6) / layout.ez))
        z0, z1 = max(0, round(kz) - half), min(slices, round(kz) + half + 1)
        if z1 <= z0:
            continue
        y0 = max(0, math.floor(min(ky, yv) - r_rv))
        y1 = min(shape[1], math.ceil(max(ky, yv) + r_rv) + 1)
        x0 = max(0, math.floor(min(kx, xv) - r_rv))
        x1 = min(shape[2], math.ceil(max(kx, xv) + r_rv) + 1)
        if y1 <= y0 or x1 <= x0:
            continue
        py = np.arange(y0, y1, dtype=np.float32)[:, None] - ky
        px_ = np.arange(x0, x1, dtype=np.float32)[None, :] - kx
        vy, vx = yv - ky, xv - kx
        t = np.clip((py * vy + px_ * vx) / max(vy * vy + vx * vx, 1e-6), 0, 1)
        near = (py - t * vy) ** 2 + (px_ - t * vx) ** 2 <= r_rv * r_rv
        box = (slice(z0, z1), slice(y0, y1), slice(x0, x1))
        fill(cls, box, near[None], VEIN, SOFT + (MUSCLE,))
