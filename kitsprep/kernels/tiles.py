"""What both kernels share: the tile sizes, the inline helpers that prefetch a tile's
runs and write its transposed rows, and the flat view (with element strides) through
which the kernels address any array layout."""

from __future__ import annotations

import numpy as np
from numba import njit

from kitsprep.kernels.intrinsics import _prefetch, _prefetchw, _transpose_block

_LINE = 64  # bytes in a cache line
_TS = 256  # most slices in a tile: the run read per (row, column), and the rows written
_PD = 1  # rows ahead for software prefetch (reads and writes)


@njit(nogil=True, inline="always")
def _prefetch_run(src, q, n, step):
    """Prefetch the run src[q : q + n] (contiguous; `step` elements a cache line)."""
    for k in range(0, n, step):
        _prefetch(src, q + k)
    _prefetch(src, q + n - 1)


@njit(nogil=True, inline="always")
def _prefetch_segments(out, o, ost, nt, nx, step):
    """Prefetch for writing the segments out[o + t*ost : ... + nx] of nt slices."""
    for t in range(nt):
        q = o + t * ost
        for k in range(0, nx, step):
            _prefetchw(out, q + k)
        _prefetchw(out, q + nx - 1)


@njit(nogil=True, inline="always")
def _put_segments(out, o, ost, buf, ts, nt, nx):
    """Transpose the tile buffer (nx columns of ts slices, flat) into the nt output row
    segments out[o + t*ost :][:nx]: in register blocks (8x8 uint16, 16x16 uint8), the
    ragged edges one by one."""
    n = 16 // buf.itemsize
    t_end = nt - nt % n
    x_end = nx - nx % n
    for t in range(0, t_end, n):
        for dx in range(0, x_end, n):
            _transpose_block(buf, dx * ts + t, ts, out, o + t * ost + dx, ost)
        for dx in range(x_end, nx):
            for j in range(n):
                out[o + (t + j) * ost + dx] = buf[dx * ts + t + j]
    for t in range(t_end, nt):
        q = o + t * ost
        for dx in range(nx):
            out[q + dx] = buf[dx * ts + t]


def _flat(a: np.ndarray) -> tuple[np.ndarray, int, int, int, int]:
    """A 3D array as (1D view over its memory span, offset of a[0, 0, 0], strides in
    elements): the kernels index it with plain integer arithmetic, so the slice-axis loop
    is a contiguous run the compiler vectorises whatever the array's layout."""
    it = a.itemsize
    st = [s // it for s in a.strides]
    dims = list(zip(a.shape, st, strict=True))
    low = a[tuple(slice(n - 1, n) if s < 0 else slice(0, 1) for n, s in dims)]  # lowest address
    span = 1 + sum(abs(s) * (n - 1) for n, s in dims)
    flat = np.lib.stride_tricks.as_strided(low, shape=(span,), strides=(it,))
    base = sum(-s * (n - 1) for n, s in dims if s < 0)
    return flat, base, st[0], st[1], st[2]


def _flattenable(a: np.ndarray) -> bool:
    return a.size > 0 and all(s % a.itemsize == 0 for s in a.strides)
