"""The gut: stomach, colon and small-bowel loops, an enhancing wall around gas or fluid, or
collapsed (solid wall, right in the kidney's intensity range). Painted only into free
abdominal fat."""

from __future__ import annotations

import numpy as np

from kitsprep.synth.layout import Layout
from kitsprep.synth.shapes import Blob, along, ellipsoid, fill, tube
from kitsprep.synth.tissues import CAVITY, FLUID, GAS, WALL


def hollow(cls: np.ndarray, blob: Blob | None, inner: float, content: int) -> None:
    """A gut segment: enhancing wall around gas or fluid, only into free abdominal fat.

    ``inner`` is the lumen's share of the radius (1 - wall / radius).
    """
    if blob is None:
        return
    fill(cls, blob.box, blob.mask, WALL, (CAVITY,))
    if content == WALL or inner <= 0:
        return  # collapsed loop: solid wall tissue throughout
    lumen = blob.u * blob.u + blob.v * blob.v + blob.t * blob.t <= inner * inner
    fill(cls, blob.box, blob.mask & lumen, content, (WALL,))


def paint_bowel(cls: np.ndarray, layout: Layout, rng: np.random.Generator) -> None:
    """Stomach, colon and small bowel, all with one wall thickness (2.5-4 mm)."""
    wall = rng.uniform(2.5, 4.0) / layout.pe
    paint_stomach(cls, layout, rng, wall)
    paint_colon(cls, layout, rng, wall)
    paint_transverse_colon(cls, layout, rng, wall)
    paint_small_bowel(cls, layout, rng, wall)


def paint_stomach(cls: np.ndarray, layout: Layout, rng: np.random.Generator, wall: float) -> None:
    """Left anterior upper abdomen, full of gas or fluid."""
    u = rng.uniform
    a, b, lk = layout.a, layout.b, layout.kidney_span
    rz = u(0.3, 0.5) * lk
    ry, rx = u(0.2, 0.3) * b, u(0.2, 0.3) * a
    centre = (
        layout.kz_lo - u(0.1, 0.4) * lk,
        layout.cy - u(0.2, 0.4) * b,
        layout.cx + u(0.1, 0.35) * a,
    )
    blob = ellipsoid(layout.shape, centre, (rz, ry, rx))
    hollow(cls, blob, 1 - wall / min(ry, rx), GAS if rng.random() < 0.5 else FLUID)


def paint_colon(cls: np.ndarray, layout: Layout, rng: np.random.Generator, wall: float) -> None:
    """Ascending (right) and descending (left) colon down the flanks."""
    u = rng.uniform
    shape, a, b = layout.shape, layout.a, layout.b
    for side in (-1, 1):
        zs = along(shape[0], layout.kz_lo + u(0.0, 0.3) * layout.kidney_span, shape[0])
        r = u(13, 22) / layout.pe
        yc = layout.cy + u(-0.1, 0.2) * b
        xc = layout.cx + side * u(0.5, 0.62) * a
        st = tube(shape, zs, yc, xc, r, r * u(0.8, 1.2))
        content = GAS if rng.random() < 0.6 else FLUID
        if st:
            fill(cls, *st, WALL, (CAVITY,))
            lumen = tube(shape, zs, yc, xc, r - wall, r - wall)
            if lumen:
                fill(cls, *lumen, content, (WALL,))


def paint_transverse_colon(
    cls: np.ndarray, layout: Layout, rng: np.random.Generator, wall: float
) -> None:
    """The transverse colon across the front of the abdomen."""
    u = rng.uniform
    ry = u(14, 20) / layout.pe
    centre = (
        layout.kz_lo + u(0.2, 0.8) * layout.kidney_span,
        layout.cy - u(0.4, 0.55) * layout.b,
        layout.cx + u(-0.1, 0.1) * layout.a,
    )
    radii = (u(15, 25) / layout.ez, ry, u(0.45, 0.6) * layout.a)
    blob = ellipsoid(layout.shape, centre, radii)
    hollow(cls, blob, 1 - wall / ry, GAS if rng.random() < 0.6 else FLUID)


def paint_small_bowel(
    cls: np.ndarray, layout: Layout, rng: np.random.Generator, wall: float
) -> None:
    """Six to thirteen loops in the lower anterior abdomen: gas, fluid or collapsed."""
    u = rng.uniform
    a, b, lk = layout.a, layout.b, layout.kidney_span
    for _ in range(int(rng.integers(6, 14))):
        r = u(10, 25) / layout.pe
        content = int(rng.choice([GAS, FLUID, WALL], p=[0.3, 0.35, 0.35]))
        ry, rx = r * u(0.7, 1.3), r * u(0.7, 1.3)
        centre = (
            u(layout.kz_lo + 0.2 * lk, layout.shape[0]),
            layout.cy + u(-0.75, 0.15) * b,
            layout.cx + u(-0.55, 0.55) * a,
        )
        blob = ellipsoid(layout.shape, centre, (u(15, 40) / layout.ez, ry, rx), u(0, np.pi))
        hollow(cls, blob, 1 - wall / min(ry, rx), content)
