"""Where the cascade's fine stage runs: kidney regions of a label volume as boxes (3D
connected components grown by a margin in mm, overlapping boxes merged, sides fitted to
the network), and the fine stage's crops pasted back into a full volume. Pure numpy (and
scipy.ndimage); volumes are (slices, rows, cols), axial axis first."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy import ndimage

__all__ = [
    "Box",
    "find_regions",
    "fit_box",
    "grow_box",
    "merge_boxes",
    "paste",
    "voxel_share",
]


class Box(NamedTuple):
    """Half-open bounds on each axis: [z0, z1) x [y0, y1) x [x0, x1)."""

    z0: int
    z1: int
    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return slice(self.z0, self.z1), slice(self.y0, self.y1), slice(self.x0, self.x1)

    @property
    def voxels(self) -> int:
        return (self.z1 - self.z0) * (self.y1 - self.y0) * (self.x1 - self.x0)


def _overlap(a: Box, b: Box) -> bool:
    return (
        a.z0 < b.z1 and b.z0 < a.z1 and a.y0 < b.y1 and b.y0 < a.y1 and a.x0 < b.x1 and b.x0 < a.x1
    )


def _union(a: Box, b: Box) -> Box:
    return Box(
        min(a.z0, b.z0), max(a.z1, b.z1), min(a.y0, b.y0), max(a.y1, b.y1),
        min(a.x0, b.x0), max(a.x1, b.x1),
    )  # fmt: skip


def merge_boxes(boxes: Sequence[Box]) -> list[Box]:
    """Overlapping boxes joined into their bounding box until none overlap, so no voxel is
    predicted (or pasted) twice; sorted by position."""
    out = [Box(*b) for b in boxes]
    merged = True
    while merged:
        merged = False
        for i in range(len(out)):
            for j in range(i + 1, len(out)):
                if _overlap(out[i], out[j]):
                    out[i] = _union(out[i], out.pop(j))
                    merged = True
                    break
            if merged:
                break
    return sorted(out)


def grow_box(box: Box, spacing: Sequence[float], margin_mm: float, shape: Sequence[int]) -> Box:
    """`box` grown by `margin_mm` on every side, in voxels of each axis (`spacing`: mm per
    voxel, slices then rows then cols: thick CT slices take fewer voxels than pixels),
    clipped to a volume of `shape`."""
    grow = [int(math.ceil(margin_mm / s)) if s > 0 else 0 for s in spacing]
    bounds = []
    for lo, hi, g, n in zip(box[::2], box[1::2], grow, shape, strict=True):
        bounds += [max(0, lo - g), min(n, hi + g)]
    return Box(*bounds)


def find_regions(mask: np.ndarray, spacing: Sequence[float], margin_mm: float) -> list[Box]:
    """Boxes around the 3D connected components of `mask` (26-connectivity), each grown by
    the margin (`grow_box`) and merged where they overlap. An empty mask has no regions."""
    labelled, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return []
    boxes = [
        grow_box(
            Box(*(v for sl in found for v in (sl.start, sl.stop))), spacing, margin_mm, mask.shape
        )
        for found in ndimage.find_objects(labelled)
    ]
    return merge_boxes(boxes)


def fit_box(box: Box, divisor: int, shape: Sequence[int], side: int | None = None) -> Box:
    """`box` with its in-plane sides grown to multiples of `divisor` (what the U-Net takes),
    or to a square of `side`, kept centred and shifted back inside a (slices, H, W) volume
    where it would cross an edge. H and W must be multiples of `divisor` themselves."""
    _, h, w = shape
    bounds = []
    for lo, hi, n in ((box.y0, box.y1, h), (box.x0, box.x1, w)):
        want = side if side is not None else -(-(hi - lo) // divisor) * divisor
        want = min(n, want)
        lo = min(max(0, lo - (want - (hi - lo)) // 2), n - want)
        bounds += [lo, lo + want]
    return Box(box.z0, box.z1, *bounds)


def paste(shape: Sequence[int], boxes: Sequence[Box], crops: Sequence[np.ndarray]) -> np.ndarray:
    """A uint8 volume of `shape`: background, with each crop written into its box. Only the
    boxes are written: a fine prediction outside them cannot leak into the result."""
    out = np.zeros(tuple(shape), np.uint8)
    for box, crop in zip(boxes, crops, strict=True):
        want = (box.z1 - box.z0, box.y1 - box.y0, box.x1 - box.x0)
        if crop.shape != want:
            raise ValueError(f"crop {crop.shape} does not fill its box {box} ({want})")
        out[box.slices] = crop
    return out


def voxel_share(boxes: Sequence[Box], shape: Sequence[int]) -> float:
    """The share of the volume's voxels inside `boxes` (non-overlapping): the fine stage's
    work relative to whole-volume inference."""
    total = math.prod(shape)
    return sum(b.voxels for b in boxes) / total if total else 0.0
