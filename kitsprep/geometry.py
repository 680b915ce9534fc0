"""Slice geometry, pure: which voxel axis is axial, and the in-plane fit to a square of
`size` (keep aspect, pad). Both are recorded per case so that predictions map back."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import nibabel as nib
import numpy as np

from kitsprep.errors import KitsError


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


def valid_spacing(values: Sequence[float]) -> bool:
    """Whether every voxel spacing is a finite positive number of mm (zero, negative, NaN
    or Inf spacing makes resampling, surface Dice and the written-back affine meaningless)."""
    return all(math.isfinite(v) and v > 0 for v in values)


def shown_spacing(values: Sequence[float]) -> str:
    """Spacing values as a user reads them: ``(0, 0.8, 0.8)``, ``nan`` and ``inf`` kept."""
    return "(" + ", ".join(f"{float(v):g}" for v in values) + ")"


def check_header_spacing(hdr: nib.Nifti1Header, name: str, file: str) -> None:
    """Refuse a NIfTI header whose voxel spacing is zero, negative, NaN or Inf, in one line
    naming the case, the file and the values. `hdr` must be read with ``check=False``:
    nibabel's own check would otherwise set a zero spacing to 1 (and a negative one to its
    absolute value) with a log line, and the wrong geometry would go on downstream."""
    pixdim = tuple(float(v) for v in hdr["pixdim"][1:4])
    where = f"{name}: {file}" if name else file
    fix = (
        "fix the header's spacing (pixdim and sform/qform) and re-export it, or leave the case out"
    )
    if not valid_spacing(pixdim):
        raise KitsError(
            f"{where} gives voxel spacing {shown_spacing(pixdim)} mm in its header (pixdim); "
            f"expected three positive finite values; {fix}"
        )
    try:
        affine = np.asarray(hdr.get_best_affine(), dtype=np.float64)
    except Exception as exc:  # nibabel refuses a qform it cannot build
        raise KitsError(f"{where} has an unusable affine in its header ({exc}); {fix}") from None
    if not np.isfinite(affine).all():
        raise KitsError(
            f"{where} has a non-finite affine in its header (sform/qform holds NaN or Inf); {fix}"
        )
    spacing = voxel_spacing(affine)
    if not valid_spacing(spacing):
        raise KitsError(
            f"{where} gives voxel spacing {shown_spacing(spacing)} mm in its header's affine "
            f"(sform/qform); expected three positive finite values; {fix}"
        )
