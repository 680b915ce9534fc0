"""numba kernels against plain numpy references written here from the spec's formulas: the
stored slices are only as trustworthy as this comparison."""

from __future__ import annotations

import numpy as np
import pytest

from kitsprep.errors import KitsError
from kitsprep.geometry import InPlane, fit_in_plane
from kitsprep.kernels import (
    NEGATIVE_LABEL,
    count_nonfinite,
    f32_to_f16_bits,
    label_counts,
    labels_resample,
    window_resample,
)
from kitsprep.window import WINDOW_PRESETS, Window

F32 = np.float32


# --------------------------------------------------------------------------- references


def ref_window(raw: np.ndarray, slope: float, inter: float, w: Window) -> np.ndarray:
    """Scale, clip, normalise in float32; the result stays float32 until the caller casts."""
    v = raw.astype(F32) * F32(slope) + F32(inter)
    v = np.minimum(np.maximum(v, F32(w.lo)), F32(w.hi))
    return (v - F32(w.offset)) / F32(w.divisor)


def ref_taps(n_src: int, n_new: int):
    """Half-pixel centres, clamped; weights in float32."""
    o = np.arange(n_new, dtype=np.float64)
    s = np.clip((o + 0.5) * (n_src / n_new) - 0.5, 0.0, n_src - 1.0)
    a = np.floor(s).astype(np.int64)
    b = np.minimum(a + 1, n_src - 1)
    return a, b, (s - a).astype(F32)


def ref_bilinear(win: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """Bilinear resample of windowed float32 slices (n, h, w) -> (n, new_h, new_w) float16."""
    ya, yb, fy = ref_taps(win.shape[1], new_h)
    xa, xb, fx = ref_taps(win.shape[2], new_w)
    fy, fx, one = fy[None, :, None], fx[None, None, :], F32(1)
    a = win[:, ya][:, :, xa]
    b = win[:, ya][:, :, xb]
    c = win[:, yb][:, :, xa]
    d = win[:, yb][:, :, xb]
    top = a * (one - fx) + b * fx
    bot = c * (one - fx) + d * fx
    return (top * (one - fy) + bot * fy).astype(np.float16)


def ref_nearest(seg: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    def idx(n_src, n_new):
        return np.minimum(
            np.floor((np.arange(n_new) + 0.5) * (n_src / n_new)).astype(np.int64), n_src - 1
        )

    return seg[:, idx(seg.shape[1], new_h)][:, :, idx(seg.shape[2], new_w)]


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance in float16 ulps (bit patterns mapped onto a monotone integer line)."""

    def line(x):
        bits = x.view(np.uint16).astype(np.int32)
        return np.where(bits & 0x8000, -(bits & 0x7FFF), bits)

    return np.abs(line(a) - line(b))


def bits(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float16).view(np.uint16)


def square(size: int) -> InPlane:
    return fit_in_plane(size, size, size)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# --------------------------------------------------------------------------- window


@pytest.mark.parametrize("preset", ["mlperf", "abdomen"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_window_identity_is_bit_exact_for_float_imaging(rng, preset, dtype):
    w = WINDOW_PRESETS[preset]
    vol = np.asfortranarray(rng.uniform(-1500, 1500, (7, 16, 16)).astype(dtype))
    vol[0, 0, :6] = [w.lo, w.hi, -1024, 0, np.nextafter(F32(w.lo), F32(0)), 3000]
    out = window_resample(vol, 1.0, 0.0, w, square(16))
    assert out.dtype == np.float16 and out.shape == (7, 16, 16)
    np.testing.assert_array_equal(bits(out), bits(ref_window(vol, 1.0, 0.0, w)))


def test_window_identity_is_bit_exact_for_scaled_int16(rng, mlperf):
    raw = np.asfortranarray(rng.integers(-2000, 2000, (5, 16, 16)).astype(np.int16))
    for slope, inter in [(1.0, -1024.0), (0.5, -3.25), (2.0, 0.0)]:
        out = window_resample(raw, slope, inter, mlperf, square(16))
        np.testing.assert_array_equal(bits(out), bits(ref_window(raw, slope, inter, mlperf)))


def test_window_clips_to_the_range_ends(mlperf):
    vol = np.array([[[-5000.0, 5000.0]] * 2], np.float32)
    out = window_resample(vol, 1.0, 0.0, mlperf, InPlane(2, 2, 2, 2, 0, 0, 2))
    assert out[0, 0, 0] == np.float16(mlperf.normalise(mlperf.lo))
    assert out[0, 0, 1] == np.float16(mlperf.normalise(mlperf.hi))


# --------------------------------------------------------------------------- bilinear


@pytest.mark.parametrize(
    "shape,size", [((4, 16, 16), 40), ((4, 48, 48), 16), ((3, 17, 29), 23), ((2, 64, 40), 32)]
)
def test_bilinear_within_one_f16_ulp(rng, mlperf, shape, size):
    vol = np.asfortranarray(rng.uniform(-200, 400, shape).astype(np.float32))
    plane = fit_in_plane(shape[1], shape[2], size)
    out = window_resample(vol, 1.0, 0.0, mlperf, plane)
    box = out[
        :,
        plane.pad_top : plane.pad_top + plane.new_h,
        plane.pad_left : plane.pad_left + plane.new_w,
    ]
    want = ref_bilinear(ref_window(vol, 1, 0, mlperf), plane.new_h, plane.new_w)
    assert ulp_distance(box, want).max() <= 1


def test_bilinear_scaled_int16(rng, mlperf):
    raw = np.asfortranarray(rng.integers(-200, 700, (3, 30, 30)).astype(np.int16))
    plane = fit_in_plane(30, 30, 20)
    out = window_resample(raw, 0.5, -100.0, mlperf, plane)
    want = ref_bilinear(ref_window(raw, 0.5, -100.0, mlperf), 20, 20)
    assert ulp_distance(out, want).max() <= 1


def test_constant_image_stays_constant_after_resample(mlperf):
    vol = np.full((2, 13, 31), 40.0, np.float32, order="F")
    plane = fit_in_plane(13, 31, 32)
    out = window_resample(vol, 1.0, 0.0, mlperf, plane)
    box = out[:, plane.pad_top : plane.pad_top + plane.new_h, :]
    assert (box == np.float16(mlperf.normalise(40.0))).all()


# --------------------------------------------------------------------------- labels


@pytest.mark.parametrize(
    "shape,size", [((5, 16, 16), 16), ((5, 16, 16), 40), ((4, 50, 50), 16), ((3, 21, 37), 32)]
)
def test_labels_nearest_exact_and_counts(rng, shape, size):
    seg = np.asfortranarray(rng.integers(0, 4, shape).astype(np.uint8))
    plane = fit_in_plane(shape[1], shape[2], size)
    counts = np.zeros((shape[0], 3), np.int64)
    out, top = labels_resample(seg, plane, counts)
    assert out.dtype == np.uint8 and out.shape == (shape[0], size, size)
    box = out[
        :,
        plane.pad_top : plane.pad_top + plane.new_h,
        plane.pad_left : plane.pad_left + plane.new_w,
    ]
    np.testing.assert_array_equal(box, ref_nearest(seg, plane.new_h, plane.new_w))
    assert top == seg.max()
    want = np.stack([(out == 1).sum((1, 2)), (out == 2).sum((1, 2)), (out >= 3).sum((1, 2))], 1)
    np.testing.assert_array_equal(counts, want)


def test_labels_slab_range_counts_go_to_absolute_rows(rng):
    """A build calls the kernel slab by slab; counts must land on the source slice rows."""
    seg = np.asfortranarray(rng.integers(0, 3, (6, 16, 16)).astype(np.uint16))
    counts = np.zeros((6, 3), np.int64)
    out, _ = labels_resample(seg, square(16), counts, 2, 5)
    np.testing.assert_array_equal(out, seg[2:5])
    assert (counts[[0, 1, 5]] == 0).all()
    np.testing.assert_array_equal(counts[2:5, 0], (seg[2:5] == 1).sum((1, 2)))
    np.testing.assert_array_equal(counts[2:5, 1], (seg[2:5] == 2).sum((1, 2)))


def test_labels_report_values_uint8_cannot_hold():
    seg = np.zeros((1, 4, 4), np.uint16)
    seg[0, 0, 0] = 300
    _, top = labels_resample(seg, square(4), np.zeros((1, 3), np.int64))
    assert top == 300


def ref_counts(labels: np.ndarray, num_values: int) -> np.ndarray:
    """Per-slice pixels of label values 1..num_values-1: np.bincount, slice by slice."""
    return np.stack([np.bincount(s.ravel(), minlength=num_values)[1:num_values] for s in labels])


@pytest.mark.parametrize("order", ["F", "C", "strided"])
@pytest.mark.parametrize("shape,size", [((7, 16, 16), 16), ((5, 21, 37), 32), ((300, 9, 9), 8)])
def test_labels_count_any_number_of_values(rng, order, shape, size):
    """Six label values (more than any KiTS edition has): the counts of 1..5 are np.bincount's,
    slice by slice, whatever the memory order, resampling or tiling (300 slices: two tiles)."""
    seg = rng.integers(0, 6, shape).astype(np.uint8)
    seg = {
        "F": np.asfortranarray(seg),
        "C": seg,
        "strided": np.asfortranarray(np.repeat(seg, 2, axis=2))[:, :, ::2],
    }[order]
    plane = fit_in_plane(shape[1], shape[2], size)
    counts = label_counts(shape[0], 6)
    assert counts.shape == (shape[0], 5) and counts.dtype == np.int64
    out, top = labels_resample(seg, plane, counts)
    box = out[
        :,
        plane.pad_top : plane.pad_top + plane.new_h,
        plane.pad_left : plane.pad_left + plane.new_w,
    ]
    want = ref_nearest(seg, plane.new_h, plane.new_w)
    np.testing.assert_array_equal(box, want)
    np.testing.assert_array_equal(counts, ref_counts(want, 6))
    assert top == seg.max() == 5
    if (plane.new_h, plane.new_w) == shape[1:]:  # no resampling: the source's own counts
        np.testing.assert_array_equal(counts, ref_counts(seg, 6))


def test_labels_count_values_beyond_the_columns_only_in_top(rng):
    """Values the counts have no column for are left out of them and show in the largest
    label, as negative ones do, with few columns (the KiTS path) and with many."""
    seg = np.asfortranarray(rng.integers(-2, 9, (6, 12, 12)).astype(np.int16))
    for num_values in (2, 3, 4, 6):
        counts = label_counts(6, num_values)
        _, top = labels_resample(seg, square(12), counts, 1, 5)
        assert (counts[[0, 5]] == 0).all()  # the slab's rows only
        want = [[(s == v).sum() for v in range(1, num_values)] for s in seg[1:5]]
        np.testing.assert_array_equal(counts[1:5], np.array(want).reshape(4, num_values - 1))
        assert top == NEGATIVE_LABEL + 2


def test_labels_count_every_uint8_value():
    """256 values, uint8's whole range: every one counted."""
    seg = np.arange(256 * 4, dtype=np.uint32).reshape(4, 16, 16).astype(np.uint8)
    counts = label_counts(4, 256)
    _, top = labels_resample(seg, square(16), counts)
    np.testing.assert_array_equal(counts, ref_counts(seg, 256))
    assert counts.sum() == 4 * 255 and top == 255


def test_counting_more_values_than_uint8_holds_is_one_line():
    for ask in (
        lambda: label_counts(3, 257),
        lambda: labels_resample(
            np.zeros((3, 4, 4), np.uint8), square(4), np.zeros((3, 256), np.int64)
        ),
    ):
        with pytest.raises(KitsError) as exc:
            ask()
        msg = str(exc.value)
        assert "\n" not in msg
        assert "257 label values" in msg and "expected 1 to 256" in msg and "0..255" in msg


# --------------------------------------------------------------------------- padding


def test_padding_box_for_non_square(rng, mlperf):
    vol = np.asfortranarray(rng.uniform(-100, 300, (3, 24, 40)).astype(np.float32))
    seg = np.asfortranarray(np.ones((3, 24, 40), np.uint8))
    plane = fit_in_plane(24, 40, 32)
    assert (plane.new_h, plane.new_w, plane.pad_top, plane.pad_left) == (19, 32, 6, 0)
    img = window_resample(vol, 1.0, 0.0, mlperf, plane)
    lab, _ = labels_resample(seg, plane, np.zeros((3, 3), np.int64))
    inside = np.zeros((32, 32), bool)
    inside[6:25, :] = True
    pad16 = np.float16(mlperf.pad_value)
    assert (img[:, ~inside] == pad16).all()
    assert (lab[:, ~inside] == 0).all() and (lab[:, inside] == 1).all()
    assert (
        ulp_distance(
            img[:, inside].reshape(3, 19, 32), ref_bilinear(ref_window(vol, 1, 0, mlperf), 19, 32)
        ).max()
        <= 1
    )


def test_padding_tall_input_pads_left_and_right(rng, mlperf):
    seg = np.ones((2, 40, 24), np.uint8, order="F")
    plane = fit_in_plane(40, 24, 32)
    assert (plane.new_h, plane.new_w, plane.pad_top, plane.pad_left) == (32, 19, 0, 6)
    lab, _ = labels_resample(seg, plane, np.zeros((2, 3), np.int64))
    assert (lab[:, :, :6] == 0).all() and (lab[:, :, 25:] == 0).all()
    assert (lab[:, :, 6:25] == 1).all()


def test_real_512x796_geometry(rng, mlperf):
    """The one non-square KiTS19 case: 512 rows x 796 cols -> 329 x 512, 91 rows of air on
    top. A few slices only."""
    plane = fit_in_plane(512, 796, 512)
    assert (plane.new_h, plane.new_w, plane.pad_top, plane.pad_left) == (329, 512, 91, 0)
    vol = np.asfortranarray(rng.uniform(-1024, 1000, (2, 512, 796)).astype(np.float32))
    seg = np.asfortranarray(rng.integers(0, 3, (2, 512, 796)).astype(np.uint8))
    img = window_resample(vol, 1.0, 0.0, mlperf, plane)
    counts = np.zeros((2, 3), np.int64)
    lab, _ = labels_resample(seg, plane, counts)
    pad16 = np.float16(mlperf.pad_value)
    assert (img[:, :91] == pad16).all() and (img[:, 91 + 329 :] == pad16).all()
    assert (lab[:, :91] == 0).all() and (lab[:, 91 + 329 :] == 0).all()
    assert (
        ulp_distance(img[:, 91:420], ref_bilinear(ref_window(vol, 1, 0, mlperf), 329, 512)).max()
        <= 1
    )
    np.testing.assert_array_equal(lab[:, 91:420], ref_nearest(seg, 329, 512))
    np.testing.assert_array_equal(counts[:, 0], (lab == 1).sum((1, 2)))
    np.testing.assert_array_equal(counts[:, 1], (lab == 2).sum((1, 2)))


def test_out_buffer_keeps_callers_padding(rng, mlperf):
    """The kernel writes only the box: a reused buffer must come back with its padding."""
    vol = np.asfortranarray(rng.uniform(-100, 300, (2, 8, 16)).astype(np.float32))
    plane = fit_in_plane(8, 16, 16)
    buf = np.full((2, 16, 16), mlperf.pad_value, np.float16)
    got = window_resample(vol, 1.0, 0.0, mlperf, plane, out=buf)
    assert got is buf
    np.testing.assert_array_equal(bits(buf), bits(window_resample(vol, 1.0, 0.0, mlperf, plane)))


# --------------------------------------------------------------------------- memory order


@pytest.mark.parametrize("size", [16, 24])
def test_memory_order_does_not_change_results(rng, mlperf, size):
    base = rng.uniform(-300, 400, (5, 16, 16)).astype(np.float32)
    seg = rng.integers(0, 3, (5, 16, 16)).astype(np.uint8)
    plane = fit_in_plane(16, 16, size)
    variants = [
        np.ascontiguousarray(base),
        np.asfortranarray(base),
        np.ascontiguousarray(base.transpose(2, 0, 1)).transpose(1, 2, 0),
        np.asfortranarray(base[:, ::-1])[:, ::-1],
    ]
    seg_variants = [
        np.ascontiguousarray(seg),
        np.asfortranarray(seg),
        np.ascontiguousarray(seg.transpose(1, 2, 0)).transpose(2, 0, 1),
    ]
    want = window_resample(variants[0], 1.0, 0.0, mlperf, plane)
    for v in variants[1:]:
        np.testing.assert_array_equal(bits(window_resample(v, 1.0, 0.0, mlperf, plane)), bits(want))
    c0 = np.zeros((5, 3), np.int64)
    want_lab, _ = labels_resample(seg_variants[0], plane, c0)
    for v in seg_variants[1:]:
        c = np.zeros((5, 3), np.int64)
        np.testing.assert_array_equal(labels_resample(v, plane, c)[0], want_lab)
        np.testing.assert_array_equal(c, c0)


# --------------------------------------------------------------------------- f16 bits


def test_f32_to_f16_bits_matches_numpy(rng):
    tiny = np.float32(2.0**-24)  # smallest float16 subnormal
    special = np.array(
        [
            0.0,
            -0.0,
            np.inf,
            -np.inf,
            np.nan,
            -np.nan,
            65504.0,
            65519.0,
            65520.0,
            1e6,
            -1e6,
            tiny,
            tiny / 2,
            tiny * 0.75,
            tiny * 1.5,
            tiny * 2.5,
            6.1e-5,
            2.0**-14,
            1e-45,
            1.0 + 2.0**-11,
            1.0 + 3 * 2.0**-11,
            2049.0,
            2051.0,
            -2049.0,
            0.1,
            1 / 3,
        ],
        np.float32,
    )
    rand = np.concatenate(
        [
            rng.standard_normal(20000).astype(np.float32) * 100,
            (rng.uniform(-1, 1, 20000) * 2.0**-14).astype(np.float32),  # f16 subnormal range
            rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32).view(np.float32),
        ]
    )
    src = np.concatenate([special, rand])
    out = np.empty(src.shape, np.uint16)
    f32_to_f16_bits(src, out)
    with np.errstate(over="ignore"):
        want = src.astype(np.float16)
    nan = np.isnan(src)
    np.testing.assert_array_equal(out[~nan], want[~nan].view(np.uint16))
    assert np.isnan(out[nan].view(np.float16)).all()


# --------------------------------------------------------------------------- nonfinite


def test_count_nonfinite():
    vol = np.zeros((3, 4, 5), np.float32, order="F")
    vol[0, 1, 2] = np.nan
    vol[2, 3, 4] = np.inf
    vol[1, 0, 0] = -np.inf
    assert count_nonfinite(vol) == 3
    assert count_nonfinite(np.ascontiguousarray(vol)) == 3
    assert count_nonfinite(vol.astype(np.float64)) == 3
    assert count_nonfinite(vol[:, ::2]) == 1  # non-contiguous view: rows 0 and 2
    assert count_nonfinite(np.zeros((2, 2, 2), np.float32)) == 0
    assert count_nonfinite(np.zeros((2, 2, 2), np.int16)) == 0
