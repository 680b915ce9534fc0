"""Tumours: label 2, a lumpy ball growing out of a kidney's surface, and its tissue and look
(hypodense, isodense, or heterogeneous with a necrotic core)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from kitsprep.synth.kidney import Kidney
from kitsprep.synth.layout import Layout, inner_body
from kitsprep.synth.shapes import Box, ellipsoid, erode2d, fill
from kitsprep.synth.tissues import NECROSIS, TUMOUR

# Mean HU range and texture range of each tumour look.
LOOKS = {
    "hypo": (40, 80, 8, 15),
    "iso": (110, 170, 10, 20),
    "hetero": (60, 120, 25, 45),
}


def grow_tumours(
    seg: np.ndarray, layout: Layout, kidneys: Sequence[Kidney], rng: np.random.Generator
) -> None:
    """One tumour, or two in a quarter of the cases, each on a kidney drawn at random."""
    inside = inner_body(layout)
    for _ in range(1 + int(rng.random() < 0.25)):
        kidney = kidneys[int(rng.integers(len(kidneys)))]
        grow_tumour(seg, layout, inside, kidney, rng)


def _surface_direction(side: int, rng: np.random.Generator) -> np.ndarray:
    """A unit direction in the kidney's own axes (t, u, v), away from the hilum; bounded and
    deterministic."""
    for _ in range(100):
        d = rng.standard_normal(3)
        d /= np.linalg.norm(d) + 1e-12
        if -side * d[1] < 0.3:
            break
    return d


def grow_tumour(
    seg: np.ndarray,
    layout: Layout,
    inside: np.ndarray,
    kidney: Kidney,
    rng: np.random.Generator,
) -> None:
    """Label 2: a lumpy ball centred near a random point of the kidney surface (not the
    hilum), partly inside the kidney and partly bulging out, from 7 to ~45 mm radius."""
    ez, pe = layout.ez, layout.pe
    centre, radii, drift = kidney.centre, kidney.radii, kidney.drift
    t, u, v = _surface_direction(kidney.side, rng)
    c, s = math.cos(kidney.theta), math.sin(kidney.theta)
    dz = t * radii[0]
    dx = u * radii[2] * c - v * radii[1] * s + drift[1] * t
    dy = u * radii[2] * s + v * radii[1] * c + drift[0] * t
    surface = np.array([centre[0] + dz, centre[1] + dy, centre[2] + dx])
    # Unit outward direction in mm, to push the tumour centre in or out of the kidney.
    out_mm = np.array([dz * ez, dy * pe, dx * pe])
    out_mm /= np.linalg.norm(out_mm) + 1e-12
    r_mm = float(np.exp(rng.uniform(math.log(7), math.log(45))))
    shift = r_mm * rng.uniform(-0.4, 0.6)
    main = surface + shift * out_mm / np.array([ez, pe, pe])
    main[0] = np.clip(main[0], 0, seg.shape[0] - 1)
    balls = [(main, r_mm)]
    for _ in range(int(rng.integers(0, 3))):  # lobulated outline
        off = rng.standard_normal(3)
        off *= 0.5 * r_mm / (np.linalg.norm(off) + 1e-12)
        balls.append((main + off / np.array([ez, pe, pe]), r_mm * rng.uniform(0.4, 0.7)))
    painted = False
    for pos, r in balls:
        blob = ellipsoid(
            seg.shape, tuple(pos), (max(r / ez, 1.0), max(r / pe, 1.5), max(r / pe, 1.5))
        )
        if blob is None:
            continue
        m = blob.mask & inside[blob.box[1:]]
        fill(seg, blob.box, m, 2)
        painted = painted or bool(m.any())
    if not painted:  # tiny tumour clipped away: keep the promise that every case has one
        z, y, x = np.clip(np.round(surface).astype(int), 0, np.array(seg.shape) - 1)
        seg[z, y, x] = 2


def draw_mode(rng: np.random.Generator) -> str:
    """The tumour's look: 'hypo', 'iso' or 'hetero' (necrotic core, coarse texture)."""
    return str(rng.choice(["hypo", "iso", "hetero"], p=[0.35, 0.3, 0.35]))


def draw_necrosis_px(rng: np.random.Generator, pe: float) -> int:
    """How far inside a heterogeneous tumour's outline its necrosis starts, in pixels."""
    return max(1, round(rng.uniform(5, 10) / pe))


def paint_tumour(cls: np.ndarray, seg: np.ndarray, box: Box, mode: str, necrosis_px: int) -> None:
    """Label 2 becomes tumour tissue, its core necrosis when the look is 'hetero'."""
    tum = seg[box] == 2
    sub = cls[box]
    sub[tum] = TUMOUR
    if mode == "hetero":
        sub[erode2d(tum, necrosis_px)] = NECROSIS


def tumour_look(mode: str, rng: np.random.Generator) -> tuple[float, float]:
    """Mean HU and texture amplitude of a tumour of look ``mode``."""
    lo, hi, tex_lo, tex_hi = LOOKS[mode]
    return rng.uniform(lo, hi), rng.uniform(tex_lo, tex_hi)
