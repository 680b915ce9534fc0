"""The image kernel: raw voxels -> windowed, resampled float16 slices in one pass
(`window_resample`), and the float16 conversion it rounds with."""

from __future__ import annotations

import numpy as np
from numba import njit

from kitsprep.geometry import InPlane
from kitsprep.kernels.intrinsics import _f16bits
from kitsprep.kernels.tiles import (
    _LINE,
    _PD,
    _TS,
    _flat,
    _flattenable,
    _prefetch_run,
    _prefetch_segments,
    _put_segments,
)
from kitsprep.window import Window

_XB = 64  # output columns per block, image: 64 float16 = two whole cache lines a segment


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


@njit(nogil=True, inline="always")
def _window_run_f16(src, p, ss, nt, slope, inter, lo, hi, offset, divisor, dst):
    if ss == 1:
        run = src[p : p + nt]  # a view indexed from 0: no wraparound test, so it vectorises
        for t in range(nt):
            v = np.float32(run[t]) * slope + inter
            v = min(max(v, lo), hi)
            dst[t] = _f16bits((v - offset) / divisor)
    else:
        for t in range(nt):
            v = np.float32(src[p + t * ss]) * slope + inter
            v = min(max(v, lo), hi)
            dst[t] = _f16bits((v - offset) / divisor)


@njit(nogil=True, inline="always")
def _window_run_f32(src, p, ss, nt, slope, inter, lo, hi, offset, divisor, dst):
    if ss == 1:
        run = src[p : p + nt]  # a view indexed from 0: no wraparound test, so it vectorises
        for t in range(nt):
            v = np.float32(run[t]) * slope + inter
            v = min(max(v, lo), hi)
            dst[t] = (v - offset) / divisor
    else:
        for t in range(nt):
            v = np.float32(src[p + t * ss]) * slope + inter
            v = min(max(v, lo), hi)
            dst[t] = (v - offset) / divisor


# --------------------------------------------------------------------------- image


@njit(nogil=True, cache=True)
def _window_resample(
    src,
    base,
    ss,
    sy,
    sx,
    src_h,
    src_w,
    s_begin,
    s_end,
    slope,
    inter,
    lo,
    hi,
    offset,
    divisor,
    new_h,
    new_w,
    pad_top,
    pad_left,
    out,
    obase,
    ost,
    orow,
    ocol,
):
    """`src`/`out`: flat views; voxel (s, y, x) at src[base + s*ss + y*sy + x*sx], output
    (i, row, col) at out[obase + i*ost + row*orow + col*ocol] (float16 bits)."""
    if s_end <= s_begin or new_h <= 0 or new_w <= 0:
        return
    identity = src_h == new_h and src_w == new_w
    step = max(1, _LINE // src.itemsize) if ss == 1 else 0  # 0: no read prefetch
    wstep = _LINE // 2 if ocol == 1 else 0
    n = s_end - s_begin
    ts = (n + (n + _TS - 1) // _TS - 1) // ((n + _TS - 1) // _TS)  # balanced tiles <= _TS
    xb = _XB if ocol == 1 else 1
    flat_buf = np.empty(xb * ts, np.uint16)  # the tile: xb columns of ts slices
    obuf = flat_buf.reshape((xb, ts))
    one = np.float32(1.0)
    y0, y1, wy = _axis_taps(src_h, new_h)
    x0, x1, wx = _axis_taps(src_w, new_w)
    ncol = 0
    if not identity:
        for c0 in range(0, new_w, xb):
            ncol = max(ncol, x1[min(c0 + xb, new_w) - 1] - x0[c0] + 1)
    m = 0 if identity else ts
    wrow = np.empty((ncol, m), np.float32)  # one windowed source row, the block's columns
    ha = np.empty((xb, m), np.float32)  # resampled along x: the upper source row
    hb = np.empty((xb, m), np.float32)  # and the lower one
    for t0 in range(s_begin, s_end, ts):
        nt = min(ts, s_end - t0)
        o_t = obase + (t0 - s_begin) * ost
        for c0 in range(0, new_w, xb):
            nx = min(xb, new_w - c0)
            o_c = o_t + (pad_left + c0) * ocol
            if identity:
                for y in range(new_h):
                    if wstep and y + _PD < new_h:
                        _prefetch_segments(
                            out, o_c + (pad_top + y + _PD) * orow, ost, nt, nx, wstep
                        )
                    for dx in range(nx):
                        p = base + t0 * ss + y * sy + (c0 + dx) * sx
                        if step and y + _PD < src_h:
                            _prefetch_run(src, p + _PD * sy, nt, step)
                        _window_run_f16(
                            src, p, ss, nt, slope, inter, lo, hi, offset, divisor, obuf[dx]
                        )
                    _put_segments(out, o_c + (pad_top + y) * orow, ost, flat_buf, ts, nt, nx)
                continue
            # Bilinear: each source row is windowed once per tile and resampled along x
            # once; output rows then blend the two cached rows (same float32 operations, in
            # the same order, as a*(1-fx) + b*fx per row then top*(1-fy) + bot*fy).
            cmin = x0[c0]
            cn = x1[c0 + nx - 1] - cmin + 1
            ra = -1
            rb = -1
            for y in range(new_h):
                ya = y0[y]
                yb = y1[y]
                fy = wy[y]
                if ya != ra and ya == rb:
                    ha, hb = hb, ha
                    ra, rb = rb, ra
                for k in range(2):
                    r = ya if k == 0 else yb
                    if r == (ra if k == 0 else rb):
                        continue
                    for c in range(cn):
                        p = base + t0 * ss + r * sy + (cmin + c) * sx
                        if step and r + _PD < src_h:
                            _prefetch_run(src, p + _PD * sy, nt, step)
                        _window_run_f32(
                            src, p, ss, nt, slope, inter, lo, hi, offset, divisor, wrow[c]
                        )
                    h = ha if k == 0 else hb
                    for dx in range(nx):
                        fx = wx[c0 + dx]
                        ga = wrow[x0[c0 + dx] - cmin]
                        gb = wrow[x1[c0 + dx] - cmin]
                        hd = h[dx]
                        for t in range(nt):
                            hd[t] = ga[t] * (one - fx) + gb[t] * fx
                    if k == 0:
                        ra = r
                    else:
                        rb = r
                if wstep and y + _PD < new_h:
                    _prefetch_segments(out, o_c + (pad_top + y + _PD) * orow, ost, nt, nx, wstep)
                for dx in range(nx):
                    top = ha[dx]
                    bot = hb[dx]
                    b = obuf[dx]
                    for t in range(nt):
                        b[t] = _f16bits(top[t] * (one - fy) + bot[t] * fy)
                _put_segments(out, o_c + (pad_top + y) * orow, ost, flat_buf, ts, nt, nx)


def window_resample(
    vol: np.ndarray,
    slope: float,
    inter: float,
    window: Window,
    plane: InPlane,
    s_begin: int = 0,
    s_end: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Slices [s_begin, s_end) of `vol` (slices first, any strides) -> float16
    (n, size, size), windowed, the plane's crop resized and padded into the square with
    air. Pass `out`
    (float16) to reuse a buffer: the kernel writes only the resized box, so the caller's
    padding must already be there. One call over many slices is faster than many calls
    over few (longer contiguous reads per column)."""
    s_end = vol.shape[0] if s_end is None else s_end
    n = s_end - s_begin
    if out is None:
        out = np.full((n, plane.size, plane.size), window.pad_value, dtype=np.float16)
    if n <= 0 or out.size == 0:
        return out
    vol = vol[(slice(None), *plane.crop)]  # a view: the kernel resizes the crop
    if not _flattenable(vol):
        vol = np.ascontiguousarray(vol)
    target = out if _flattenable(out) else out.copy()
    src, base, ss, sy, sx = _flat(vol)
    dst, obase, ost, orow, ocol = _flat(target.view(np.uint16))
    f32 = np.float32
    _window_resample(
        src,
        base,
        ss,
        sy,
        sx,
        vol.shape[1],
        vol.shape[2],
        s_begin,
        s_end,
        f32(slope),
        f32(inter),
        f32(window.lo),
        f32(window.hi),
        f32(window.offset),
        f32(window.divisor),
        plane.new_h,
        plane.new_w,
        plane.pad_top,
        plane.pad_left,
        dst,
        obase,
        ost,
        orow,
        ocol,
    )
    if target is not out:
        out[...] = target
    return out
