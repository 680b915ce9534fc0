"""Training patches: how big a square patch is, and where it is cut from a slice.

Training on patches instead of whole slices is nnU-Net's recipe: a patch of half the slice
side costs a quarter of the compute, so the same time budget sees four times the samples,
and a patch cut around a foreground pixel puts more labelled anatomy into every batch.
The U-Net is fully convolutional, so validation and inference still run on whole slices.
"""

from __future__ import annotations

import numpy as np

from kitsprep.errors import KitsError
from kitstrain.core.config import check_patch

__all__ = ["patch_origin", "resolve_patch", "uniform_origin"]


def resolve_patch(patch: int | str | None, size: int, divisor: int) -> int:
    """The patch side in pixels for slices of `size`; `divisor` is the U-Net's 2**depth.

    'auto' is half the slice side, rounded down to a multiple of `divisor` and never under
    two of them, so the deepest level still sees a 2x2 map; 'full' (or None) is the slice."""
    check_patch(patch)
    if patch is None or patch == "full":
        return size
    if patch == "auto":
        return min(size, max(2 * divisor, (size // 2) // divisor * divisor))
    if patch > size:
        raise KitsError(
            f"--patch {patch} is larger than the store's {size}x{size} slices; "
            f"use at most {size}, or 'full'"
        )
    if patch % divisor:
        lower = patch // divisor * divisor
        raise KitsError(
            f"--patch {patch} is not a multiple of {divisor} (2**depth), which the "
            f"U-Net needs; use {lower or divisor} or {lower + divisor}"
        )
    return patch


def patch_origin(
    label: np.ndarray,
    patch: int,
    rng: np.random.Generator,
    present: np.ndarray,
) -> tuple[int, int]:
    """Top-left (row, col) of a `patch` x `patch` window on an (H, W) label.

    A slice with foreground gets a window that contains one of its foreground pixels: a
    class drawn uniformly among the foreground classes present (so a small tumour is as
    likely a target as a large kidney), then one of that class's pixels, placed anywhere
    in the window (not always at its centre, or the model would learn where organs sit).
    A slice without foreground gets a uniformly placed window.

    `present`: the foreground values the label holds, ascending, as the store's index
    counts them: no pass over the label to find them."""
    h, w = label.shape
    if patch > h or patch > w:
        raise ValueError(f"patch {patch} does not fit a {h}x{w} slice")
    if present.size == 0:
        return uniform_origin((h, w), patch, rng)
    # a Python int: an int64 scalar would widen the uint8 comparison below 8-fold
    cls = int(present[rng.integers(0, present.size)])
    # flat positions in row-major order, as 2-D np.nonzero lists them, at ~1/15 its cost
    where = np.flatnonzero(label.ravel() == cls)
    if where.size == 0:
        raise ValueError(f"label value {cls} is said to be present but the label holds none")
    row, col = divmod(int(where[rng.integers(0, where.size)]), w)
    return _around(row, h, patch, rng), _around(col, w, patch, rng)


def uniform_origin(shape: tuple[int, int], patch: int, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left of a window placed uniformly on a slice of `shape`: `patch_origin` for a
    slice known to hold no foreground, without looking at its label."""
    h, w = shape
    return int(rng.integers(0, h - patch + 1)), int(rng.integers(0, w - patch + 1))


def _around(p: int, n: int, patch: int, rng: np.random.Generator) -> int:
    """A window start in [0, n - patch] such that the window covers position p."""
    lo, hi = max(0, p - patch + 1), min(p, n - patch)
    return int(rng.integers(lo, hi + 1))
