"""numba kernels: the per-voxel work of a build, one fused pass each.

`window_resample` reads the raw stored voxels (any dtype, any strides), applies the NIfTI
scale/intercept, clips and normalises (window), resamples in-plane (bilinear, half-pixel
centres), and writes IEEE float16 bits. `labels_resample` does nearest neighbour for labels
and counts classes per slice on the way.

Memory order is what these kernels are about. NIfTI volumes are Fortran-ordered: the slice
axis is contiguous, and for one column x the whole (slice, row) plane is one contiguous run.
The output is C-ordered (slices, size, size). So the work is a 3D transpose of slices and
columns with the rows in the middle, plus arithmetic. Both kernels walk tiles of up to _TS
slices x one block of output columns, with the rows inside a tile:
- reads: per row, each column of the block is one contiguous run over the tile's slices
  (with the whole call range in one tile, the column's plane is read front to back): a few
  streams, which a software prefetch of the next row's runs keeps ahead of;
- compute: along each run (a view indexed from 0, so it vectorises), into a tile buffer;
- writes: the tile buffer is transposed in registers (8x8 uint16, 16x16 uint8 blocks) into
  one segment per slice of whole cache lines, whose next-row counterparts are prefetched
  for writing so the stores don't wait for each line's read-for-ownership in turn.
Longer slice ranges per call mean longer runs: callers should pass many slices at once.
Results are bit-exact with the plain per-voxel formulas (no fastmath: the float32
operations, their order and the float16 rounding are those of the reference).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from kitsprep.geometry import InPlane
from kitsprep.window import Window

_LINE = 64  # bytes in a cache line
_TS = 256  # most slices in a tile: the run read per (row, column), and the rows written
_XB = 64  # output columns per block, image: 64 float16 = two whole cache lines a segment
_LXB = 128  # output columns per block, labels: 128 uint8 = two whole cache lines
# (and at most 255: the per-row counters are bytes)
NEGATIVE_LABEL = 1 << 40  # labels_resample reports a negative label v as this - v
_PD = 1  # rows ahead for software prefetch (reads and writes)


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


def _prefetch_intrinsic(write: int):
    """`llvm.prefetch` of &arr[idx] (1D array) into all cache levels; a hint: never faults,
    so an address past the end is harmless."""

    @intrinsic
    def prefetch(typingctx, arr, idx):
        if not (isinstance(arr, types.Array) and arr.ndim == 1 and isinstance(idx, types.Integer)):
            return None

        def codegen(context, builder, signature, args):
            ary = context.make_array(signature.args[0])(context, builder, args[0])
            i = context.cast(builder, args[1], signature.args[1], types.intp)
            i8p = ir.IntType(8).as_pointer()
            i32 = ir.IntType(32)
            fn = cgutils.get_or_insert_function(
                builder.module,
                ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                "llvm.prefetch.p0",
            )
            ptr = builder.bitcast(builder.gep(ary.data, [i]), i8p)
            builder.call(fn, [ptr, i32(write), i32(3), i32(1)])
            return context.get_dummy_value()

        return types.void(arr, idx), codegen

    return prefetch


_prefetch = _prefetch_intrinsic(0)
_prefetchw = _prefetch_intrinsic(1)


@intrinsic
def _like(typingctx, x, c):
    """`c` as a value of x's type: a typed constant, so that comparing uint8 labels with
    it stays in uint8 lanes instead of numba's promotion to int64."""
    if not (isinstance(x, types.Integer) and isinstance(c, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        return context.cast(builder, args[1], signature.args[1], signature.args[0])

    return x(x, c), codegen


@intrinsic
def _transpose_block(typingctx, src, s_off, s_stride, dst, d_off, d_stride):
    """Transpose one 128-bit block, 8x8 uint16 or 16x16 uint8, in registers: rows
    src[s_off + i*s_stride :][:n] -> rows dst[d_off + j*d_stride :][:n]. log2(n) rounds of
    interleaving row i with row i + n/2 (punpckl/punpckh on x86, zip1/zip2 on arm64)."""
    if not (
        isinstance(src, types.Array)
        and isinstance(dst, types.Array)
        and src.ndim == 1
        and dst.ndim == 1
        and src.dtype == dst.dtype
        and isinstance(src.dtype, types.Integer)
        and src.dtype.bitwidth in (8, 16)
    ):
        return None
    bits = src.dtype.bitwidth
    n = 128 // bits

    def codegen(context, builder, signature, args):
        a_src = context.make_array(signature.args[0])(context, builder, args[0])
        a_dst = context.make_array(signature.args[3])(context, builder, args[3])
        so, ss, do, ds = (
            context.cast(builder, args[i], signature.args[i], types.intp) for i in (1, 2, 4, 5)
        )
        intp = context.get_value_type(types.intp)
        vec = ir.VectorType(ir.IntType(bits), n)
        rows = []
        for i in range(n):
            at = builder.add(so, builder.mul(ss, ir.Constant(intp, i)))
            ptr = builder.bitcast(builder.gep(a_src.data, [at]), vec.as_pointer())
            rows.append(builder.load(ptr, align=bits // 8, typ=vec))
        mask = ir.VectorType(ir.IntType(32), n)
        lo = ir.Constant(mask, [j // 2 + (n if j % 2 else 0) for j in range(n)])
        hi = ir.Constant(mask, [n // 2 + j // 2 + (n if j % 2 else 0) for j in range(n)])
        for _ in range(n.bit_length() - 1):
            rows = [
                builder.shuffle_vector(rows[i // 2], rows[i // 2 + n // 2], hi if i % 2 else lo)
                for i in range(n)
            ]
        for j in range(n):
            at = builder.add(do, builder.mul(ds, ir.Constant(intp, j)))
            ptr = builder.bitcast(builder.gep(a_dst.data, [at]), vec.as_pointer())
            builder.store(rows[j], ptr, align=bits // 8)
        return context.get_dummy_value()

    return types.void(src, s_off, s_stride, dst, d_off, d_stride), codegen


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


# --------------------------------------------------------------------------- helpers


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


# --------------------------------------------------------------------------- labels


@njit(nogil=True, cache=True)
def _labels_resample(
    src,
    base,
    ss,
    sy,
    sx,
    src_h,
    src_w,
    s_begin,
    s_end,
    new_h,
    new_w,
    pad_top,
    pad_left,
    out,
    obase,
    ost,
    orow,
    ocol,
    counts,
):
    if s_end <= s_begin or new_h <= 0 or new_w <= 0:
        return 0
    ys = _nearest_taps(src_h, new_h)
    xs = _nearest_taps(src_w, new_w)
    step = max(1, _LINE // src.itemsize) if ss == 1 else 0
    wstep = _LINE if ocol == 1 else 0
    n = s_end - s_begin
    ts = (n + (n + _TS - 1) // _TS - 1) // ((n + _TS - 1) // _TS)
    xb = _LXB if ocol == 1 else 1
    flat_buf = np.empty(xb * ts, np.uint8)
    buf = flat_buf.reshape((xb, ts))
    # Per-slice class counts of a tile: uint8 ones over one row of the block (xb <= 255
    # voxels a slice: byte-wide vector adds), flushed into int64 ones after each row.
    cnt = np.zeros((3, ts), np.int64)
    row_cnt = np.zeros((3, ts), np.uint8)
    k1 = row_cnt[0]
    k2 = row_cnt[1]
    k3 = row_cnt[2]
    top = 0
    for t0 in range(s_begin, s_end, ts):
        nt = min(ts, s_end - t0)
        cnt[:, :] = 0
        o_t = obase + (t0 - s_begin) * ost
        for c0 in range(0, new_w, xb):
            nx = min(xb, new_w - c0)
            o_c = o_t + (pad_left + c0) * ocol
            for y in range(new_h):
                r = ys[y]
                r_next = ys[min(y + _PD, new_h - 1)]
                if wstep and y + _PD < new_h:
                    _prefetch_segments(out, o_c + (pad_top + y + _PD) * orow, ost, nt, nx, wstep)
                for dx in range(nx):
                    p = base + t0 * ss + r * sy + xs[c0 + dx] * sx
                    if step and r_next != r:
                        _prefetch_run(src, p + (r_next - r) * sy, nt, step)
                    b = buf[dx]
                    hi = src[p]
                    lo = src[p]
                    one = _like(hi, 1)
                    two = _like(hi, 2)
                    three = _like(hi, 3)
                    if ss == 1:
                        run = src[p : p + nt]
                        for t in range(nt):
                            v = run[t]
                            b[t] = np.uint8(v)  # truncation: v & 0xFF
                            k1[t] += np.uint8(v == one)
                            k2[t] += np.uint8(v == two)
                            k3[t] += np.uint8(v == three)
                            hi = max(hi, v)
                            lo = min(lo, v)
                    else:
                        for t in range(nt):
                            v = src[p + t * ss]
                            b[t] = np.uint8(v)  # truncation: v & 0xFF
                            k1[t] += np.uint8(v == one)
                            k2[t] += np.uint8(v == two)
                            k3[t] += np.uint8(v == three)
                            hi = max(hi, v)
                            lo = min(lo, v)
                    # the largest label; a negative one v reported as NEGATIVE_LABEL - v
                    top = max(top, np.int64(hi))
                    if lo < 0:
                        top = max(top, NEGATIVE_LABEL - np.int64(lo))
                _put_segments(out, o_c + (pad_top + y) * orow, ost, flat_buf, ts, nt, nx)
                for j in range(3):
                    for t in range(nt):
                        cnt[j, t] += row_cnt[j, t]
                        row_cnt[j, t] = 0
        for t in range(nt):
            counts[t0 + t, 0] += cnt[0, t]
            counts[t0 + t, 1] += cnt[1, t]
            counts[t0 + t, 2] += cnt[2, t]
    return top


# --------------------------------------------------------------------------- nonfinite


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


# --------------------------------------------------------------------------- wrappers


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
    (n, size, size), windowed and fitted into the square with air padding. Pass `out`
    (float16) to reuse a buffer: the kernel writes only the resized box, so the caller's
    padding must already be there. One call over many slices is faster than many calls
    over few (longer contiguous reads per column)."""
    s_end = vol.shape[0] if s_end is None else s_end
    n = s_end - s_begin
    if out is None:
        out = np.full((n, plane.size, plane.size), window.pad_value, dtype=np.float16)
    if n <= 0 or out.size == 0:
        return out
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


def labels_resample(
    seg: np.ndarray,
    plane: InPlane,
    counts: np.ndarray,
    s_begin: int = 0,
    s_end: int | None = None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Nearest-neighbour labels into a uint8 (n, size, size) square (background padding),
    adding per-slice pixel counts of label values 1, 2 and 3 into `counts` (slices, 3). Returns
    the labels and the largest label seen, so callers can refuse labels that uint8 can't hold
    (a negative label v is reported as NEGATIVE_LABEL - v: above any real label)."""
    s_end = seg.shape[0] if s_end is None else s_end
    n = s_end - s_begin
    if out is None:
        out = np.zeros((n, plane.size, plane.size), dtype=np.uint8)
    if n <= 0 or out.size == 0:
        return out, 0
    if seg.dtype.kind == "b":
        seg = seg.view(np.uint8)
    elif seg.dtype.kind not in "iu":  # not a mask dtype; truncated, as int64(v) would
        seg = seg.astype(np.int64)
    if not _flattenable(seg):
        seg = np.ascontiguousarray(seg)
    target = out if _flattenable(out) else out.copy()
    src, base, ss, sy, sx = _flat(seg)
    dst, obase, ost, orow, ocol = _flat(target)
    top = _labels_resample(
        src,
        base,
        ss,
        sy,
        sx,
        seg.shape[1],
        seg.shape[2],
        s_begin,
        s_end,
        plane.new_h,
        plane.new_w,
        plane.pad_top,
        plane.pad_left,
        dst,
        obase,
        ost,
        orow,
        ocol,
        counts,
    )
    if target is not out:
        out[...] = target
    return out, int(top)
