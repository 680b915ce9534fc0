"""The NaN/Inf check of an imaging volume, one branch-free pass."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def _count_nonfinite(flat):
    n = 0
    for i in range(flat.shape[0]):
        d = flat[i] - flat[i]  # 0 for finite values, NaN for NaN and +-Inf: branch-free
        n += d != d
    return n


def count_nonfinite(raw: np.ndarray) -> int:
    """NaN/Inf voxels in a float volume (integer volumes cannot hold any)."""
    if raw.dtype.kind != "f":
        return 0
    return int(_count_nonfinite(raw.reshape(-1, order="A")))
