"""The liver on the patient's right (low columns), down to the right kidney's upper half,
with a few hypodense cysts of its own (fluid, not a kidney label)."""

from __future__ import annotations

import numpy as np

from kitsprep.synth.layout import Layout
from kitsprep.synth.shapes import ellipsoid, fill
from kitsprep.synth.tissues import CAVITY, FLUID, LIVER


def paint_liver(cls: np.ndarray, layout: Layout, rng: np.random.Generator) -> None:
    """A tilted ellipsoid of liver in the free abdominal fat, then zero to two cysts in it."""
    u = rng.uniform
    shape, ez, pe, a, b = layout.shape, layout.ez, layout.pe, layout.a, layout.b
    lk = layout.kidney_span
    rz = u(0.9, 1.3) * lk
    zc = layout.kz_lo + u(0.25, 0.6) * lk - rz
    liver = (zc, layout.cy + u(-0.2, 0.0) * b, layout.cx - u(0.3, 0.42) * a)
    radii = (rz, u(0.55, 0.7) * b, u(0.45, 0.6) * a)
    blob = ellipsoid(shape, liver, radii, u(-0.3, 0.3), (-0.15 * b, -0.1 * a))
    if not blob:
        return
    fill(cls, blob.box, blob.mask, LIVER, (CAVITY,))
    for _ in range(int(rng.integers(0, 3))):  # cysts: hypodense round lesions, not kidney
        r = u(4, 14)
        centre = (
            liver[0] + u(0, 0.6) * rz,
            liver[1] + u(-0.3, 0.3) * b,
            liver[2] + u(-0.3, 0.2) * a,
        )
        cyst = ellipsoid(shape, centre, (r / ez, r / pe, r / pe))
        if cyst:
            fill(cls, cyst.box, cyst.mask, FLUID, (LIVER,))
