"""Voxelised shapes the painters are built from: ellipsoids, stacks of ellipses (tubes that
bend, grow or split), in-plane erosion, and a masked fill that only overwrites chosen classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Box = tuple[slice, slice, slice]
# A stack of ellipses: its bounding box and the mask inside it.
Stack = tuple[Box, np.ndarray]


@dataclass(frozen=True)
class Blob:
    """A voxelised ellipsoid: bounding box, mask, and normalised coordinates inside it.

    (t, u, v) are the ellipsoid's own axes scaled to [-1, 1]: t along the slices, u along the
    rotated in-plane 'x' axis, v along the rotated 'y' axis.
    """

    box: Box
    mask: np.ndarray
    t: np.ndarray
    u: np.ndarray
    v: np.ndarray


def frame(
    shape: tuple[int, int, int], z0: int, cy: np.ndarray, cx: np.ndarray, reach: float
) -> tuple[Box, np.ndarray, np.ndarray] | None:
    """Bounding box of a stack of shapes centred at (cy[k], cx[k]) on slices z0.., and the
    offsets (dy, dx) of its voxels from those centres, shaped to broadcast (nz, h, w)."""
    _, rows, cols = shape
    if len(cy) == 0:
        return None
    y0 = max(0, math.floor(float(cy.min()) - reach))
    y1 = min(rows, math.ceil(float(cy.max()) + reach) + 1)
    x0 = max(0, math.floor(float(cx.min()) - reach))
    x1 = min(cols, math.ceil(float(cx.max()) + reach) + 1)
    if y1 <= y0 or x1 <= x0:
        return None
    dy = np.arange(y0, y1, dtype=np.float32)[None, :, None] - cy[:, None, None].astype(np.float32)
    dx = np.arange(x0, x1, dtype=np.float32)[None, None, :] - cx[:, None, None].astype(np.float32)
    return (slice(z0, z0 + len(cy)), slice(y0, y1), slice(x0, x1)), dy, dx


def ellipsoid(
    shape: tuple[int, int, int],
    centre: tuple[float, float, float],
    radii: tuple[float, float, float],
    theta: float = 0.0,
    drift: tuple[float, float] = (0.0, 0.0),
) -> Blob | None:
    """Ellipsoid with in-plane rotation ``theta`` whose in-plane centre moves linearly by
    ``drift`` (dy, dx px) from its centre to its inferior pole, to tilt organs like kidneys."""
    zc, yc, xc = centre
    rz, ry, rx = max(radii[0], 0.5), max(radii[1], 0.5), max(radii[2], 0.5)
    z0 = max(0, math.ceil(zc - rz))
    z1 = min(shape[0], math.floor(zc + rz) + 1)
    if z1 <= z0:
        return None
    t = (np.arange(z0, z1) - zc) / rz
    found = frame(shape, z0, yc + drift[0] * t, xc + drift[1] * t, max(ry, rx))
    if found is None:
        return None
    box, dy, dx = found
    c, s = math.cos(theta), math.sin(theta)
    u = (dx * c + dy * s) / rx
    v = (dy * c - dx * s) / ry
    tt = t.astype(np.float32)[:, None, None]
    mask = u * u + v * v + tt * tt <= 1.0
    return Blob(box, mask, tt, u, v)


def stack(
    shape: tuple[int, int, int],
    z0: int,
    cy: np.ndarray,
    cx: np.ndarray,
    ry: np.ndarray,
    rx: np.ndarray,
    theta: float = 0.0,
) -> Stack | None:
    """A stack of ellipses on slices z0.. with per-slice centres and radii: tubes that bend,
    grow or split (vessels, psoas, colon)."""
    ry = np.asarray(ry, np.float32)
    rx = np.asarray(rx, np.float32)
    if len(ry) == 0:
        return None
    found = frame(shape, z0, np.asarray(cy), np.asarray(cx), float(max(ry.max(), rx.max())))
    if found is None:
        return None
    box, dy, dx = found
    c, s = math.cos(theta), math.sin(theta)
    ry3 = np.maximum(ry, 1e-3)[:, None, None]
    rx3 = np.maximum(rx, 1e-3)[:, None, None]
    u = (dx * c + dy * s) / rx3
    v = (dy * c - dx * s) / ry3
    return box, (u * u + v * v <= 1.0) & (np.minimum(ry3, rx3) > 0.3)


def along(slices: int, z0: float, z1: float) -> np.ndarray:
    """Slice numbers in [z0, z1) inside a volume of ``slices`` slices."""
    return np.arange(max(0, math.ceil(z0)), min(slices, math.ceil(z1)), dtype=np.float32)


def tube(
    shape: tuple[int, int, int], zs: np.ndarray, yc: object, xc: object, ry: object, rx: object
) -> Stack | None:
    """Ellipses on slices ``zs``; each parameter a number or one value per slice."""
    if zs.size == 0:
        return None
    per = [np.broadcast_to(np.asarray(v, np.float32), zs.shape) for v in (yc, xc, ry, rx)]
    return stack(shape, int(zs[0]), *per)


def fill(
    cls: np.ndarray,
    box: Box,
    mask: np.ndarray,
    value: int,
    allowed: Sequence[int] | None = None,
) -> None:
    """Set ``cls[box][mask] = value``, only over voxels whose class is in ``allowed``: a
    painter never overwrites what it must not (a vessel never cuts through bone)."""
    sub = cls[box]
    m = np.broadcast_to(mask, sub.shape)
    if allowed is not None:
        m = m & np.isin(sub, allowed)
    sub[m] = value


def erode2d(mask: np.ndarray, n: int) -> np.ndarray:
    """In-plane binary erosion, ``n`` steps alternating 4- and 8-neighbourhoods (roughly
    round), in-plane only because slice thickness varies 10-fold between cases."""
    m = mask.copy()
    for step in range(n):
        if not m.any():
            break
        e = m.copy()
        e[:, 1:, :] &= m[:, :-1, :]
        e[:, :-1, :] &= m[:, 1:, :]
        e[:, :, 1:] &= m[:, :, :-1]
        e[:, :, :-1] &= m[:, :, 1:]
        if step % 2:
            e[:, 1:, 1:] &= m[:, :-1, :-1]
            e[:, :-1, :-1] &= m[:, 1:, 1:]
            e[:, 1:, :-1] &= m[:, :-1, 1:]
            e[:, :-1, 1:] &= m[:, 1:, :-1]
        m = e
    return m
