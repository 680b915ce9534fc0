"""Muscles beside the spine: paraspinal muscles behind it, the psoas beside it growing
towards the pelvis (muscle shares the kidney's intensity range)."""

from __future__ import annotations

import numpy as np

from kitsprep.synth.layout import Layout
from kitsprep.synth.shapes import along, fill, tube
from kitsprep.synth.tissues import CAVITY, FAT, MUSCLE, SOFT


def paint_paraspinal(cls: np.ndarray, layout: Layout, rng: np.random.Generator) -> None:
    """Two muscle columns behind the spine, over every slice."""
    u = rng.uniform
    shape, sy, sx, rv = layout.shape, layout.spine_y, layout.spine_x, layout.rv
    for side in (-1, 1):
        st = tube(
            shape,
            along(shape[0], 0, shape[0]),
            sy + 2.0 * rv,
            sx + side * 1.5 * rv,
            rv * u(0.9, 1.2),
            rv * u(1.0, 1.4),
        )
        if st:
            fill(cls, *st, MUSCLE, (CAVITY, MUSCLE, FAT))


def paint_psoas(cls: np.ndarray, layout: Layout, rng: np.random.Generator) -> None:
    """The psoas muscles from about the kidneys' upper poles down, widening as they go."""
    u = rng.uniform
    shape, slices = layout.shape, layout.shape[0]
    sy, sx, rv = layout.spine_y, layout.spine_x, layout.rv
    z_ps = layout.kz_lo + u(-0.1, 0.3) * layout.kidney_span
    zs = along(slices, z_ps, slices)
    if zs.size:
        grow = np.clip((zs - z_ps) / max(slices - 1.0 - z_ps, 1.0), 0, 1)
        r_ps = u(18, 28) / layout.pe * (0.25 + 0.75 * grow)
        for side in (-1, 1):
            st = tube(shape, zs, sy - 0.1 * rv, sx + side * (rv + 0.8 * r_ps), r_ps * 0.85, r_ps)
            if st:
                fill(cls, *st, MUSCLE, SOFT)
