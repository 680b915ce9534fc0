"""Slice geometry, pure: which voxel axis is axial, and the in-plane fit to a square of
`size` (keep aspect, pad). Both are recorded per case so that predictions map back."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import nibabel as nib
import numpy as np


@dataclass(frozen=True)
class InPlane:
    """Resize (src_h, src_w) -> (new_h, new_w) keeping aspect, then pad into size x size at
    (pad_top, pad_left). Inverse: crop the padded box, resize back to (src_h, src_w)."""

    src_h: int
    src_w: int
    new_h: int
    new_w: int
    pad_top: int
    pad_left: int
    size: int

    @property
    def is_identity(self) -> bool:
        return self.src_h == self.new_h == self.size and self.src_w == self.new_w == self.size

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def fit_in_plane(src_h: int, src_w: int, size: int) -> InPlane:
    """Scale the longer side to `size`, round the shorter one, centre it."""
    scale = size / max(src_h, src_w)
    new_h = min(size, max(1, round(src_h * scale)))
    new_w = min(size, max(1, round(src_w * scale)))
    return InPlane(src_h, src_w, new_h, new_w, (size - new_h) // 2, (size - new_w) // 2, size)


def axial_axes(affine: np.ndarray) -> tuple[int, int, int]:
    """Voxel-axis permutation that puts the superior-inferior axis first and keeps the other
    two in their stored order. KiTS19 volumes are already (slices, rows, cols): (0, 1, 2)."""
    ornt = nib.orientations.io_orientation(affine)
    world = [int(w) for w in ornt[:, 0]]
    axial = world.index(2)
    return (axial, *[a for a in range(3) if a != axial])


def axcodes(affine: np.ndarray) -> str:
    return "".join(nib.aff2axcodes(affine))


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(v) for v in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))
