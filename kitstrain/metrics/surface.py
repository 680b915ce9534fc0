"""Surface Dice is the official KiTS21/23 number (neheller/kits23 ``compute_metrics_for_case``,
which calls DeepMind's ``surface_distance``): the surface is made of the surfels of the 2x2x2
neighbour code of each mask, weighted by the area that code has at the voxel spacing, and
surface Dice = (gt area within tolerance of the predicted surface + predicted area within
tolerance of the gt surface) / (gt area + predicted area). The area table is DeepMind's
(``surface_distance.lookup_tables``), taken from the package rather than copied, so the areas
are the evaluator's by construction. What is ours is the speed: the volume is cut to the union
bounding box of both masks, and instead of two distance transforms over that box and a Python
sort of every surfel (the official code), each surfel only looks for a surfel of the other
surface among the few voxel offsets within the tolerance, nearest first, and stops at the first
hit. `tests/kitstrain/metrics/test_metrics.py` and `benchmarks/score.py` hold it to the package's
functions to 1e-4.

KiTS19 has no official surface Dice. Its extra column uses the KiTS21 tolerance of the region
that writes the same label (kidney ~ kidney_and_mass 1.03 mm: KiTS19's kidney includes the
masses; tumour ~ tumor 1.15 mm): those tolerances were measured as inter-annotator disagreement
on the same kind of CT, so the column is comparable across editions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kitsprep.labels import EDITIONS, LabelSet, Region
from kitstrain.metrics.overlap import check_shapes


def surface_tolerance(ls: LabelSet, region: Region) -> float:
    """The region's surface-Dice tolerance in mm; for an edition without one (KiTS19), the
    KiTS21 tolerance of the region that writes the same label (module docstring)."""
    if region.tolerance_mm is not None:
        return region.tolerance_mm
    for r in EDITIONS["kits21"].regions:
        if r.writes == region.writes:
            return float(r.tolerance_mm)
    raise ValueError(f"{ls.edition} region {region.name!r} has no surface-Dice tolerance")


def _area_table(spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    # DeepMind's own table and neighbourhood weights: imported, not copied (module docstring).
    from surface_distance import lookup_tables

    kernel = np.asarray(lookup_tables.ENCODE_NEIGHBOURHOOD_3D_KERNEL, np.uint8)
    table = lookup_tables.create_table_neighbour_code_to_surface_area(
        tuple(float(s) for s in spacing)
    )
    return kernel, np.asarray(table, np.float64)


def _neighbour_codes(mask: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """The 2x2x2 neighbour code at every voxel corner of ``mask`` (shape + 1 per axis), the
    same numbers as ``scipy.ndimage.correlate(crop, kernel, mode="constant")`` on DeepMind's
    crop: corner g sees voxels g-1 and g on each axis, outside the mask counts as empty."""
    padded = np.zeros(tuple(n + 2 for n in mask.shape), np.uint8)
    padded[1:-1, 1:-1, 1:-1] = mask
    n0, n1, n2 = (n + 1 for n in mask.shape)
    code = np.zeros((n0, n1, n2), np.uint8)
    for a in (0, 1):
        for b in (0, 1):
            for c in (0, 1):
                code |= padded[a : a + n0, b : b + n1, c : c + n2] * kernel[a, b, c]
    return code


def _tolerance_offsets(spacing: np.ndarray, tol: float) -> np.ndarray:
    """Integer voxel offsets whose length in mm is within ``tol``, nearest first."""
    r = np.floor(tol / spacing).astype(int)
    grid = np.stack(np.meshgrid(*(np.arange(-k, k + 1) for k in r), indexing="ij"), -1)
    grid = grid.reshape(-1, 3)
    # The length as the distance transform computes it: sqrt of the sum of squares in mm.
    dist = np.sqrt(((grid * spacing) ** 2).sum(axis=1))
    keep = dist <= tol
    return grid[keep][np.argsort(dist[keep], kind="stable")]


def _within(points: np.ndarray, other: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """For each flat index in ``points`` (into the padded grid behind ``other``), whether a
    True of ``other`` lies at one of ``offsets`` from it. Points stop looking at the first
    hit, so a good prediction costs about one look per surfel."""
    hit = np.zeros(points.shape, bool)
    todo = np.arange(points.size)
    strides = np.array(other.strides) // other.itemsize
    flat = other.reshape(-1)
    for off in offsets:
        found = flat[points[todo] + int(off @ strides)]
        hit[todo[found]] = True
        todo = todo[~found]
        if todo.size == 0:
            break
    return hit


def surface_dice(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], tolerance_mm: float
) -> float:
    """Surface Dice of two 3D masks at ``tolerance_mm``, with the voxel ``spacing`` in mm per
    axis of the arrays: the official KiTS21/23 number (module docstring). Both empty: 1.0;
    one empty: 0.0."""
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    check_shapes(p, t)
    if p.ndim != 3 or len(spacing) != 3:
        raise ValueError(
            f"surface_dice: expected 3D masks and 3 spacings; found shape "
            f"{p.shape} and spacing {tuple(spacing)}"
        )
    box_p, box_t = bounding_box(p), bounding_box(t)
    if box_p is None and box_t is None:
        return 1.0
    if box_p is None or box_t is None:
        return 0.0
    box = tuple(
        slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(box_p, box_t, strict=True)
    )
    p, t = p[box], t[box]
    sp = np.asarray(spacing, np.float64)
    kernel, table = _area_table(tuple(sp))
    offsets = _tolerance_offsets(sp, float(tolerance_mm))
    margin = np.abs(offsets).max(axis=0) if offsets.size else np.zeros(3, int)

    def surfels(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        code = _neighbour_codes(mask, kernel)
        border = (code != 0) & (code != 255)
        # the border on a grid padded by the offsets' reach, so every look stays inside
        grid = np.zeros(tuple(n + 2 * m for n, m in zip(code.shape, margin, strict=True)), bool)
        grid[tuple(slice(m, m + n) for n, m in zip(code.shape, margin, strict=True))] = border
        idx = np.flatnonzero(grid)
        return grid, idx, table[code[border]]

    # np.flatnonzero on the padded grid and boolean indexing of the code share C order, so
    # surfel i of `idx` has area `area[i]`.
    grid_t, idx_t, area_t = surfels(t)
    grid_p, idx_p, area_p = surfels(p)
    near_t = _within(idx_t, grid_p, offsets)
    near_p = _within(idx_p, grid_t, offsets)
    total = area_t.sum() + area_p.sum()
    return float((area_t[near_t].sum() + area_p[near_p].sum()) / total)


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of the nonzero voxels, None when there are none. One pass over the whole
    array (first axis), the others only over the slab that has any."""
    m = np.asarray(mask)
    if m.ndim == 0 or m.size == 0:
        return None
    if m.flags.f_contiguous and not m.flags.c_contiguous:
        # NIfTI volumes come in Fortran order: walk the transpose, which is C order
        box = bounding_box(m.T)
        return None if box is None else box[::-1]
    first = np.flatnonzero(m.reshape(m.shape[0], -1).any(axis=1))
    if first.size == 0:
        return None
    box = [slice(int(first[0]), int(first[-1]) + 1)]
    if m.ndim > 1:
        plane = m[box[0]].any(axis=0)
        for axis in range(plane.ndim):
            others = tuple(a for a in range(plane.ndim) if a != axis)
            nz = np.flatnonzero(plane.any(axis=others) if others else plane)
            box.append(slice(int(nz[0]), int(nz[-1]) + 1))
    return tuple(box)


def foreground_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of a mask's True voxels as slices (the whole array when empty):
    every region of KiTS is inside the box of ``labels != 0``, so metrics run on that box."""
    box = bounding_box(mask)
    return box if box is not None else tuple(slice(0, n) for n in np.shape(mask))
