"""A target in-plane spacing for the store (`kitsprep build --spacing auto|MM|none`), pure:
the option, its resolution over a cohort, and one case's transform at that spacing (crop
to the body and the labels, resize, pad; `geometry.InPlane`). KiTS19's in-plane spacing
runs from 0.44 to 1.04 mm, so without a target the same kidney spans twice as many pixels
in one case as in another; nnU-Net's 2D configuration resamples every slice to the
cohort's median spacing first. `kitsprep build` and `kitstrain` (predictions of new
volumes) both choose a case's transform here, so they cannot disagree."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kitsprep.errors import KitsError
from kitsprep.geometry import InPlane, fit_in_plane

# Air is about -1000 HU, lung -900 to -500, fat -100: above this a voxel is body (or table).
BODY_HU = -500.0
BODY_SAMPLE_SLICES = 32  # slices the body box is read from, evenly spread over the case
BODY_SHARE = 0.01  # a row/column is body where it holds this share of the busiest one's
# body voxels: noise and small artefacts in the air do not stretch the box

WINDOW_SLACK = 1e-4  # source pixels: a window this close to a whole number is that number
Box = tuple[int, int, int, int]  # rows [r0, r1), columns [c0, c1) of a source slice


@dataclass(frozen=True)
class Spacing:
    """`--spacing` as given and as resolved: `mm` is the in-plane mm per stored pixel, or
    None to fit the whole slice into the square whatever its spacing (``none``)."""

    option: str  # "auto", "none", or the number given
    mm: float | None


NO_SPACING = Spacing("none", None)  # today's behaviour, and what a version 2 store had


def parse_spacing(text: str) -> str:
    """`--spacing` checked: ``auto``, ``none`` or a positive finite number of mm, returned
    normalised (``"0.8"``); one line naming what was given otherwise."""
    value = str(text).strip().lower()
    if value in ("auto", "none"):
        return value
    try:
        mm = float(value)
    except ValueError:
        raise KitsError(
            f"--spacing {text!r} is not auto, none or a number; expected e.g. --spacing auto "
            "(the cohort's median in-plane spacing), --spacing 0.8 (mm) or --spacing none"
        ) from None
    if not (math.isfinite(mm) and mm > 0):
        raise KitsError(
            f"--spacing {text} is not a positive finite number of mm; pass e.g. "
            "--spacing 0.8, or auto or none"
        )
    return f"{mm:g}"


def resolve_spacing(option: str, in_plane: Sequence[tuple[float, float]]) -> Spacing:
    """The target of a parsed `--spacing` over the in-plane spacings (row, column mm) of
    the cases being built: ``auto`` is their median, nnU-Net's 2D rule."""
    if option == "none":
        return Spacing(option, None)
    if option == "auto":
        if not in_plane:
            raise KitsError(
                "--spacing auto needs at least one readable case to take the median "
                "spacing of; pass --spacing MM or none"
            )
        return Spacing(option, float(np.median(np.asarray(in_plane, np.float64))))
    return Spacing(option, float(option))


def mask_box(mask: np.ndarray, share: float = 0.0) -> Box | None:
    """Bounding box of a (slices, rows, cols) mask over all its slices; rows and columns
    holding no more than `share` of the busiest one's voxels are left out. None if empty."""
    # Summed over slices first: along NIfTI's contiguous axis, with no copy of the volume.
    plane = mask.sum(axis=0, dtype=np.int64)
    rows, cols = plane.sum(axis=1), plane.sum(axis=0)
    if not rows.any():
        return None
    r = np.flatnonzero(rows > share * rows.max())
    c = np.flatnonzero(cols > share * cols.max())
    return int(r[0]), int(r[-1]) + 1, int(c[0]), int(c[-1]) + 1


def body_box(image: np.ndarray, slope: float, inter: float) -> Box | None:
    """Where the body is in a (slices, rows, cols) volume of raw voxels (HU = raw * slope +
    inter): voxels above BODY_HU on a few evenly spread slices, noise left out."""
    n = image.shape[0]
    picks = np.unique(np.linspace(0, n - 1, min(n, BODY_SAMPLE_SLICES)).round().astype(int))
    hu = np.asarray(image[picks], np.float32) * np.float32(slope) + np.float32(inter)
    return mask_box(hu > BODY_HU, BODY_SHARE)


def union_box(*boxes: Box | None) -> Box | None:
    """The smallest box holding every given box (None ones skipped)."""
    given = [b for b in boxes if b is not None]
    if not given:
        return None
    return (
        min(b[0] for b in given),
        max(b[1] for b in given),
        min(b[2] for b in given),
        max(b[3] for b in given),
    )


def _crop_span(start: int, stop: int, window: int, extent: int) -> tuple[int, int]:
    """A span of `window` source pixels (at most `extent`, at least stop - start) centred
    on [start, stop), moved inside [0, extent) without leaving out any of [start, stop)."""
    length = min(extent, max(window, stop - start))
    first = round((start + stop - length) / 2)
    first = min(max(first, stop - length), start)  # holds [start, stop)
    return min(max(first, 0), extent - length), length


def plan_in_plane(
    src_h: int,
    src_w: int,
    spacing: tuple[float, float],
    size: int,
    target: float | None,
    keep: Box | None,
) -> InPlane:
    """One case's transform: with no target, the whole slice fitted into the square
    (`fit_in_plane`); else each pixel resized to `target` mm, a size x size window at that
    spacing cropped around `keep` (the body and labels) and padded where the slice is
    smaller. Where `keep` is wider than the window, the case is resized further down until
    it fits (`InPlane.shrink` < 1): no pixel of `keep` is ever cut."""
    if target is None:
        return fit_in_plane(src_h, src_w, size)
    r0, r1, c0, c1 = keep if keep is not None else (0, src_h, 0, src_w)
    scale_h, scale_w = spacing[0] / target, spacing[1] / target  # stored px per source px
    shrink = min(1.0, size / ((r1 - r0) * scale_h), size / ((c1 - c0) * scale_w))
    scale_h, scale_w = scale_h * shrink, scale_w * shrink
    # The window in source pixels, floored so that it never exceeds the square once resized;
    # the tolerance absorbs headers' float32 spacings (0.8 is 0.800000012 there).
    top, crop_h = _crop_span(r0, r1, math.floor(size / scale_h + WINDOW_SLACK), src_h)
    left, crop_w = _crop_span(c0, c1, math.floor(size / scale_w + WINDOW_SLACK), src_w)
    new_h = min(size, max(1, round(crop_h * scale_h)))
    new_w = min(size, max(1, round(crop_w * scale_w)))
    return InPlane(
        src_h,
        src_w,
        new_h,
        new_w,
        (size - new_h) // 2,
        (size - new_w) // 2,
        size,
        top,
        left,
        crop_h,
        crop_w,
        round(shrink, 6),
    )


def case_plane(
    image: np.ndarray,
    slope: float,
    inter: float,
    spacing: tuple[float, float],
    size: int,
    target: float | None,
    labels: np.ndarray | None = None,
) -> InPlane:
    """The transform of a (slices, rows, cols) volume (axial axis first) at `target` mm
    (None: the whole slice), keeping its body and, when given, every labelled voxel. The
    build passes the labels; a new volume at predict time has its body alone."""
    _, src_h, src_w = image.shape
    if target is None:
        return fit_in_plane(src_h, src_w, size)
    keep = body_box(image, slope, inter)
    if labels is not None:
        keep = union_box(keep, mask_box(labels != 0))
    return plan_in_plane(src_h, src_w, spacing, size, target, keep)
