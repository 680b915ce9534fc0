"""The spleen: postero-lateral on the patient's left, upper abdomen."""

from __future__ import annotations

import numpy as np

from kitsprep.synth.layout import Layout
from kitsprep.synth.shapes import ellipsoid, fill
from kitsprep.synth.tissues import CAVITY, SPLEEN


def paint_spleen(cls: np.ndarray, layout: Layout, rng: np.random.Generator) -> None:
    """A rotated ellipsoid of spleen in the free abdominal fat."""
    u = rng.uniform
    a, b, lk = layout.a, layout.b, layout.kidney_span
    rz = u(0.35, 0.5) * lk
    centre = (
        layout.kz_lo + u(0.0, 0.4) * lk - rz,
        layout.cy + u(0.1, 0.3) * b,
        layout.cx + u(0.45, 0.6) * a,
    )
    radii = (rz, u(0.25, 0.35) * b, u(0.14, 0.2) * a)
    blob = ellipsoid(layout.shape, centre, radii, u(0.3, 0.7))
    if blob:
        fill(cls, blob.box, blob.mask, SPLEEN, (CAVITY,))
