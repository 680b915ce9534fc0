"""The body's layers: air | subcutaneous fat | muscle wall | abdominal cavity (visceral fat).
Every other painter paints into the class volume this one starts."""

from __future__ import annotations

import numpy as np

from kitsprep.synth.layout import Layout, body_rho
from kitsprep.synth.tissues import AIR, CAVITY, FAT, MUSCLE


def layer_shares(layout: Layout) -> tuple[float, float]:
    """Fat and muscle-wall thickness as shares of the body's mean half-axis (the units of
    `body_rho`'s radius)."""
    mean_r = (layout.a + layout.b) / 2
    return layout.fat / mean_r, layout.wall / mean_r


def paint_body(layout: Layout, rng: np.random.Generator) -> np.ndarray:
    """A new class volume (uint8) of the body's layers. The outline breathes a little along
    z so that slices differ."""
    slices = layout.shape[0]
    u = rng.uniform
    z = np.arange(slices, dtype=np.float32)
    _, _, rho = body_rho(layout)
    scale = 1.0 + 0.03 * np.sin(2 * np.pi * z * layout.ez / u(150, 300) + u(0, 2 * np.pi))
    fat_r, wall_r = layer_shares(layout)
    lut = np.array([CAVITY, MUSCLE, FAT, AIR], np.uint8)
    cls = np.empty(layout.shape, np.uint8)
    for k, sc in enumerate(scale.astype(np.float32)):  # per slice: stays in cache, 4x faster
        layer = (rho > sc - fat_r - wall_r).view(np.uint8)
        layer += rho > sc - fat_r
        layer += rho > sc
        cls[k] = lut[layer]
    return cls
