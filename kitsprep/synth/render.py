"""Tissue classes -> HU: a per-case mean and texture amplitude per class, a smooth texture
field, spatially correlated noise, a reconstruction-kernel blur, integer HU."""

from __future__ import annotations

import math

import numpy as np

from kitsprep.synth.cyst import cyst_look
from kitsprep.synth.layout import Layout
from kitsprep.synth.tissues import (
    AIR,
    ARTERY,
    BONE,
    CAVITY,
    CORTEX,
    CORTICAL,
    CSF,
    CYST,
    DISC,
    FAT,
    FLUID,
    GAS,
    LIVER,
    MEDULLA,
    MUSCLE,
    N_CLASSES,
    NECROSIS,
    PELVIS,
    SPLEEN,
    TUMOUR,
    VEIN,
    WALL,
)
from kitsprep.synth.tumour import tumour_look

HU_MIN, HU_MAX = -1024.0, 3071.0
_RENDER_CHUNK = 4  # slices rendered at a time: small enough to stay in cache
_TEXTURE_CELL_MM = 12.0  # spacing of the texture field's coarse nodes
# Per class: mean HU drawn from [lo, hi], and the texture amplitude (HU).
TISSUE_HU = {
    AIR: (-1000, -1000, 0),
    FAT: (-115, -85, 8),
    MUSCLE: (40, 60, 8),
    CAVITY: (-110, -75, 15),
    LIVER: (60, 130, 8),
    SPLEEN: (100, 130, 8),
    WALL: (60, 110, 15),
    FLUID: (0, 30, 4),
    GAS: (-950, -750, 60),
    ARTERY: (150, 250, 6),
    VEIN: (110, 200, 8),
    BONE: (200, 400, 60),
    CORTICAL: (600, 1000, 80),
    DISC: (70, 100, 8),
    CSF: (5, 25, 4),
    CORTEX: (150, 200, 10),
    MEDULLA: (80, 120, 10),
    PELVIS: (0, 30, 4),
    NECROSIS: (10, 40, 8),
}


def interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Linear interpolation weights from ``n_in`` coarse nodes to ``n_out`` samples."""
    pos = np.linspace(0.0, n_in - 1.0, n_out)
    i0 = np.clip(np.floor(pos).astype(np.int64), 0, n_in - 2)
    w = (pos - i0).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), i0] = 1.0 - w
    m[np.arange(n_out), i0 + 1] = w
    return m


def blur_inplane(hu: np.ndarray) -> np.ndarray:
    """[1 2 1]/4 along rows then columns (edges replicated): partial-volume edges and the
    spatially correlated noise of a reconstruction kernel."""
    for axis in (1, 2):
        a = np.moveaxis(hu, axis, 0)
        out = a * np.float32(0.5)
        out[1:] += np.float32(0.25) * a[:-1]
        out[:-1] += np.float32(0.25) * a[1:]
        out[0] += np.float32(0.25) * a[0]
        out[-1] += np.float32(0.25) * a[-1]
        hu = np.moveaxis(out, 0, axis)
    return hu


def tissue_looks(
    cls: np.ndarray, mode: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """This case's mean HU and texture amplitude of every class (float32, by class)."""
    u = rng.uniform
    mean = np.zeros(N_CLASSES, np.float32)
    amp = np.zeros(N_CLASSES, np.float32)
    for k, (lo, hi, tex) in TISSUE_HU.items():
        mean[k] = u(lo, hi)
        amp[k] = tex
    if (cls == CYST).any():  # drawn only then: a KiTS19 case's stream stays as it was
        mean[CYST], amp[CYST] = cyst_look(rng)
    if rng.random() < 0.25:  # nephrographic phase: medulla catches up with the cortex
        mean[MEDULLA] = mean[CORTEX] - u(10, 30)
    mean[TUMOUR], amp[TUMOUR] = tumour_look(mode, rng)
    return mean, amp


def render(cls: np.ndarray, mode: str, layout: Layout, rng: np.random.Generator) -> np.ndarray:
    """HU = per-case tissue mean + smooth texture + correlated noise, blurred, integer HU."""
    mean, amp = tissue_looks(cls, mode, rng)
    sigma = rng.uniform(10, 25) / 0.375  # the [1 2 1]^2 blur divides the noise std by 2.67

    # Smooth texture field: coarse Gaussian nodes ~12 mm apart, linearly interpolated.
    slices, rows, cols = cls.shape
    cell = _TEXTURE_CELL_MM
    nz = max(2, math.ceil(slices * layout.ez / cell) + 1)
    ny = max(2, math.ceil(rows * layout.pe / cell) + 1)
    nx = max(2, math.ceil(cols * layout.pe / cell) + 1)
    coarse = rng.standard_normal((nz, ny, nx), dtype=np.float32)
    plane = interp_matrix(rows, ny) @ (coarse @ interp_matrix(cols, nx).T)  # (nz, rows, cols)
    # Along z the interpolation is two nodes per slice: gather them instead of a dense matmul.
    pos = np.linspace(0.0, nz - 1.0, slices)
    i0 = np.clip(np.floor(pos).astype(np.int64), 0, nz - 2)
    w = (pos - i0).astype(np.float32)[:, None, None]

    out = np.empty(cls.shape, np.float32)
    for z0 in range(0, slices, _RENDER_CHUNK):
        z1 = min(slices, z0 + _RENDER_CHUNK)
        c = cls[z0:z1]
        wz = w[z0:z1]
        field = plane[i0[z0:z1]] * (1 - wz) + plane[i0[z0:z1] + 1] * wz
        hu = np.take(mean, c)
        hu += np.take(amp, c) * field
        hu += rng.standard_normal(c.shape, dtype=np.float32) * np.float32(sigma)
        hu = blur_inplane(hu)
        np.rint(hu, out=hu)
        np.clip(hu, HU_MIN, HU_MAX, out=hu)
        out[z0:z1] = hu
    return out
