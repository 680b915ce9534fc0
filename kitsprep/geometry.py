"""Slice geometry, pure: which voxel axis is axial, and the in-plane transform to a square
of `size` (crop, resize, pad; `kitsprep.spacing` chooses it at a target spacing). Both are
recorded per case so that predictions map back."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import nibabel as nib
import numpy as np

from kitsprep.errors import KitsError


@dataclass(frozen=True)
class InPlane:
    """One case's in-plane transform, source slice -> stored square: crop the source to
    rows [crop_top, crop_top + crop_h) and columns [crop_left, crop_left + crop_w), resize
    that box to (new_h, new_w), pad it into size x size at (pad_top, pad_left). Inverse:
    take the padded box, resize it back to the crop, put it at the crop's place in a
    (src_h, src_w) slice of background. `shrink` is 1, or the factor (< 1) by which a
    case was resized beyond its target spacing so that its body and labels fit the square.
    Records written before the crop existed (format 2) read as the whole slice."""

    src_h: int
    src_w: int
    new_h: int
    new_w: int
    pad_top: int
    pad_left: int
    size: int
    crop_top: int = 0
    crop_left: int = 0
    crop_h: int = -1  # -1: the whole slice (set in __post_init__)
    crop_w: int = -1
    shrink: float = 1.0

    def __post_init__(self) -> None:
        if self.crop_h < 0:
            object.__setattr__(self, "crop_h", self.src_h)
        if self.crop_w < 0:
            object.__setattr__(self, "crop_w", self.src_w)

    @property
    def is_identity(self) -> bool:
        return (
            self.src_h == self.new_h == self.crop_h == self.size
            and self.src_w == self.new_w == self.crop_w == self.size
        )

    @property
    def crop(self) -> tuple[slice, slice]:
        """Rows and columns of a source slice that the stored square shows."""
        return (
            slice(self.crop_top, self.crop_top + self.crop_h),
            slice(self.crop_left, self.crop_left + self.crop_w),
        )

    @property
    def box(self) -> tuple[slice, slice]:
        """Rows and columns of a stored square that hold the (resized) crop, not padding."""
        return (
            slice(self.pad_top, self.pad_top + self.new_h),
            slice(self.pad_left, self.pad_left + self.new_w),
        )

    def as_dict(self) -> dict[str, int | float]:
        return asdict(self)


def fit_in_plane(src_h: int, src_w: int, size: int) -> InPlane:
    """Scale the longer side to `size`, round the shorter one, centre it."""
    scale = size / max(src_h, src_w)
    new_h = min(size, max(1, round(src_h * scale)))
    new_w = min(size, max(1, round(src_w * scale)))
    return InPlane(src_h, src_w, new_h, new_w, (size - new_h) // 2, (size - new_w) // 2, size)


def nearest_taps(n_src: int, n_new: int) -> np.ndarray:
    """Source index of each of `n_new` output pixels, nearest neighbour with half-pixel
    centres: the label kernel's rule (`kernels.labels._nearest_taps`)."""
    return np.minimum(((np.arange(n_new) + 0.5) * (n_src / n_new)).astype(np.int64), n_src - 1)


def restore_labels(labels: np.ndarray, plane: InPlane) -> np.ndarray:
    """Stored labels (slices, size, size) back on the source grid (slices, src_h, src_w),
    nearest neighbour, background outside the crop: the inverse of the label transform,
    exact wherever the store did not downsample (crop_h <= new_h and crop_w <= new_w)."""
    rows, cols = plane.box
    box = labels[:, rows, cols]
    out = np.zeros((labels.shape[0], plane.src_h, plane.src_w), labels.dtype)
    ys = nearest_taps(plane.new_h, plane.crop_h)
    xs = nearest_taps(plane.new_w, plane.crop_w)
    out[(slice(None), *plane.crop)] = box[:, ys[:, None], xs[None, :]]
    return out


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
