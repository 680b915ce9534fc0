"""The label kernel: masks -> nearest-neighbour uint8 slices, with each slice's pixel
count per label value and the largest label seen, in one pass (`labels_resample`)."""

from __future__ import annotations

import numpy as np
from numba import njit

from kitsprep.errors import KitsError
from kitsprep.geometry import InPlane
from kitsprep.kernels.intrinsics import _like
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

_LXB = 128  # output columns per block, labels: 128 uint8 = two whole cache lines
# (and at most 255: the per-row counters are bytes)
NEGATIVE_LABEL = 1 << 40  # labels_resample reports a negative label v as this - v
MAX_LABEL_VALUES = 256  # values a uint8 label slice holds (0..255): the most that are counted


def _check_label_values(num_values: int) -> None:
    if not 1 <= num_values <= MAX_LABEL_VALUES:
        raise KitsError(
            f"asked to count {num_values} label values per slice, expected 1 to "
            f"{MAX_LABEL_VALUES} (the values 0..255 a uint8 label slice holds); count the "
            "label set's values only (counts of shape (slices, values - 1))"
        )


def label_counts(n_slices: int, num_values: int) -> np.ndarray:
    """Zeroed per-slice counts for `labels_resample`: (n_slices, num_values - 1) int64, column
    j for label value j + 1 (background, value 0, is not counted: it is what is left of the
    slice). A KitsError for more values than uint8 labels hold."""
    _check_label_values(num_values)
    return np.zeros((n_slices, num_values - 1), np.int64)


@njit(nogil=True, cache=True)
def _nearest_taps(n_src, n_new):
    idx = np.empty(n_new, np.int64)
    ratio = n_src / n_new
    for o in range(n_new):
        idx[o] = min(int((o + 0.5) * ratio), n_src - 1)
    return idx


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
    # Per-slice counts of label values 1..k (k = counts.shape[1]) over a tile. k <= 3 (every
    # KiTS edition): values 1, 2 and 3 are counted in uint8 ones over one row of the block
    # (xb <= 255 voxels a slice: byte-wide vector adds), flushed into int64 ones after each
    # row. More values: each voxel adds one to its value's int64 counter (a scatter, not
    # vectorised, but one add a voxel whatever k).
    k = counts.shape[1]
    few = k <= 3
    cnt = np.zeros((max(3, k), ts), np.int64)
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
                    if few:
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
                    elif ss == 1:
                        run = src[p : p + nt]
                        for t in range(nt):
                            v = run[t]
                            b[t] = np.uint8(v)  # truncation: v & 0xFF
                            w = np.int64(v)
                            if w >= 1 and w <= k:
                                cnt[w - 1, t] += 1
                            hi = max(hi, v)
                            lo = min(lo, v)
                    else:
                        for t in range(nt):
                            v = src[p + t * ss]
                            b[t] = np.uint8(v)  # truncation: v & 0xFF
                            w = np.int64(v)
                            if w >= 1 and w <= k:
                                cnt[w - 1, t] += 1
                            hi = max(hi, v)
                            lo = min(lo, v)
                    # the largest label; a negative one v reported as NEGATIVE_LABEL - v
                    top = max(top, np.int64(hi))
                    if lo < 0:
                        top = max(top, NEGATIVE_LABEL - np.int64(lo))
                _put_segments(out, o_c + (pad_top + y) * orow, ost, flat_buf, ts, nt, nx)
                if few:
                    for j in range(3):
                        for t in range(nt):
                            cnt[j, t] += row_cnt[j, t]
                            row_cnt[j, t] = 0
        for t in range(nt):
            for j in range(k):
                counts[t0 + t, j] += cnt[j, t]
    return top


def labels_resample(
    seg: np.ndarray,
    plane: InPlane,
    counts: np.ndarray,
    s_begin: int = 0,
    s_end: int | None = None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Nearest-neighbour labels of the plane's crop into a uint8 (n, size, size) square
    (background padding), adding per-slice pixel counts of label values 1..k into `counts`
    (slices, k) int64, column j for value j + 1 (`label_counts` makes one; k + 1 values,
    background included, at most 256). Returns the labels and the largest label seen, so
    callers can refuse labels that uint8 can't hold or that `counts` has no column for (a
    negative label v is reported as NEGATIVE_LABEL - v: above any real label)."""
    _check_label_values(counts.shape[1] + 1)
    s_end = seg.shape[0] if s_end is None else s_end
    n = s_end - s_begin
    if out is None:
        out = np.zeros((n, plane.size, plane.size), dtype=np.uint8)
    if n <= 0 or out.size == 0:
        return out, 0
    seg = seg[(slice(None), *plane.crop)]  # a view: the kernel resizes the crop
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
