"""numba kernels: the per-voxel work of a build, one fused pass each.

`window_resample_into` reads the raw stored voxels (any dtype, any strides), applies the
NIfTI scale/intercept, clips and normalises (window), resamples in-plane (bilinear,
half-pixel centres), and writes IEEE float16 bits. `labels_resample_into` does nearest
neighbour for labels and counts classes per slice on the way. Both loop with the slice axis
innermost because NIfTI volumes are Fortran-ordered: that axis is contiguous on disk.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from kitsprep.geometry import InPlane
from kitsprep.window import Window

_TILE = 32  # slices per tile: 32 int16 voxels = one 64-byte cache line of the source


@intrinsic
def _f16bits(typingctx, x):
    """float -> IEEE half bits via LLVM's fptrunc (vcvtps2ph with F16C, fcvt on arm64):
    round-to-nearest-even, the same result as numpy's .astype(np.float16). numba has no
    float16 type, so the half value travels as its uint16 bit pattern."""
    if not isinstance(x, types.Float):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if v.type != ir.FloatType():
            v = builder.fptrunc(v, ir.FloatType())
        return builder.bitcast(builder.fptrunc(v, ir.HalfType()), ir.IntType(16))

    return types.uint16(x), codegen


@njit(nogil=True, cache=True)
def f32_to_f16_bits(src, out):
    """Vector form of the conversion, for tests and for callers holding float32 data."""
    for i in range(src.shape[0]):
        out[i] = _f16bits(src[i])


@njit(nogil=True, cache=True)
def _axis_taps(n_src, n_new):
    """Bilinear source taps for each output pixel (half-pixel centres, edge-clamped)."""
    i0 = np.empty(n_new, np.int64)
    i1 = np.empty(n_new, np.int64)
    w = np.empty(n_new, np.float32)
    ratio = n_src / n_new
    for o in range(n_new):
        s = (o + 0.5) * ratio - 0.5
        s = min(max(s, 0.0), n_src - 1.0)
        a = int(np.floor(s))
        i0[o] = a
        i1[o] = min(a + 1, n_src - 1)
        w[o] = np.float32(s - a)
    return i0, i1, w


@njit(nogil=True, cache=True)
def _nearest_taps(n_src, n_new):
    idx = np.empty(n_new, np.int64)
    ratio = n_src / n_new
    for o in range(n_new):
        idx[o] = min(int((o + 0.5) * ratio), n_src - 1)
    return idx


@njit(nogil=True, cache=True)
def _window_resample(vol, s_begin, s_end, slope, inter, lo, hi, offset, divisor,
                     new_h, new_w, pad_top, pad_left, out16):
    n_s, src_h, src_w = vol.shape
    identity = src_h == new_h and src_w == new_w
    y0, y1, wy = _axis_taps(src_h, new_h)
    x0, x1, wx = _axis_taps(src_w, new_w)
    buf = np.empty((new_w, _TILE), np.uint16)
    one = np.float32(1.0)
    for t0 in range(s_begin, s_end, _TILE):
        nt = min(_TILE, s_end - t0)
        for y in range(new_h):
            for x in range(new_w):
                if identity:
                    for t in range(nt):
                        v = np.float32(vol[t0 + t, y, x]) * slope + inter
                        v = min(max(v, lo), hi)
                        buf[x, t] = _f16bits((v - offset) / divisor)
                else:
                    ya, yb, fy = y0[y], y1[y], wy[y]
                    xa, xb, fx = x0[x], x1[x], wx[x]
                    for t in range(nt):
                        s = t0 + t
                        a = (min(max(np.float32(vol[s, ya, xa]) * slope + inter, lo), hi)
                             - offset) / divisor
                        b = (min(max(np.float32(vol[s, ya, xb]) * slope + inter, lo), hi)
                             - offset) / divisor
                        c = (min(max(np.float32(vol[s, yb, xa]) * slope + inter, lo), hi)
                             - offset) / divisor
                        d = (min(max(np.float32(vol[s, yb, xb]) * slope + inter, lo), hi)
                             - offset) / divisor
                        top = a * (one - fx) + b * fx
                        bot = c * (one - fx) + d * fx
                        buf[x, t] = _f16bits(top * (one - fy) + bot * fy)
            # Row-wise stores: slices sit 2*size*size bytes apart, a power of two that
            # would alias every store of a column onto one cache set.
            for t in range(nt):
                row = out16[t0 + t - s_begin, pad_top + y]
                for x in range(new_w):
                    row[pad_left + x] = buf[x, t]


@njit(nogil=True, cache=True)
def _labels_resample(seg, s_begin, s_end, new_h, new_w, pad_top, pad_left, out, counts):
    n_s, src_h, src_w = seg.shape
    ys = _nearest_taps(src_h, new_h)
    xs = _nearest_taps(src_w, new_w)
    top = 0
    for t0 in range(s_begin, s_end, _TILE):
        nt = min(_TILE, s_end - t0)
        for y in range(new_h):
            sy = ys[y]
            for x in range(new_w):
                sx = xs[x]
                for t in range(nt):
                    v = np.int64(seg[t0 + t, sy, sx])
                    if v > top:
                        top = v
                    if v < 0:
                        top = max(top, 256 - v)
                    out[t0 + t - s_begin, pad_top + y, pad_left + x] = np.uint8(v & 0xFF)
                    if v >= 1:
                        counts[t0 + t, min(v, 3) - 1] += 1
    return top


@njit(nogil=True, cache=True)
def _count_nonfinite(flat):
    n = 0
    for i in range(flat.shape[0]):
        if not np.isfinite(flat[i]):
            n += 1
    return n


def count_nonfinite(raw: np.ndarray) -> int:
    """NaN/Inf voxels in a float volume (integer volumes cannot hold any)."""
    if raw.dtype.kind != "f":
        return 0
    return int(_count_nonfinite(raw.reshape(-1, order="A")))


def window_resample(vol: np.ndarray, slope: float, inter: float, window: Window,
                    plane: InPlane, s_begin: int = 0, s_end: int | None = None,
                    out: np.ndarray | None = None) -> np.ndarray:
    """Slices [s_begin, s_end) of `vol` (slices first, any strides) -> float16
    (n, size, size), windowed and fitted into the square with air padding. Pass `out`
    (float16) to reuse a buffer: the kernel writes only the resized box, so the caller's
    padding must already be there."""
    s_end = vol.shape[0] if s_end is None else s_end
    n = s_end - s_begin
    if out is None:
        out = np.full((n, plane.size, plane.size), window.pad_value, dtype=np.float16)
    f32 = np.float32
    _window_resample(vol, s_begin, s_end, f32(slope), f32(inter), f32(window.lo),
                     f32(window.hi), f32(window.offset), f32(window.divisor), plane.new_h,
                     plane.new_w, plane.pad_top, plane.pad_left, out.view(np.uint16))
    return out


def labels_resample(seg: np.ndarray, plane: InPlane, counts: np.ndarray, s_begin: int = 0,
                    s_end: int | None = None, out: np.ndarray | None = None
                    ) -> tuple[np.ndarray, int]:
    """Nearest-neighbour labels into a uint8 (n, size, size) square (background padding),
    adding per-slice pixel counts of labels 1, 2 and >=3 into `counts` (slices, 3). Returns
    the labels and the largest label seen, so callers can refuse labels that uint8 can't hold."""
    s_end = seg.shape[0] if s_end is None else s_end
    n = s_end - s_begin
    if out is None:
        out = np.zeros((n, plane.size, plane.size), dtype=np.uint8)
    top = _labels_resample(seg, s_begin, s_end, plane.new_h, plane.new_w, plane.pad_top,
                           plane.pad_left, out, counts)
    return out, int(top)
