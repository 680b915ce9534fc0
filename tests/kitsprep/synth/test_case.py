"""One synthetic case in memory: shapes, labels, anatomy, determinism, kits23 cysts,
and painting around a given mask."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from kitsprep.errors import KitsError
from kitsprep.synth import SynthConfig, encode_case, make_case, paint_imaging

SHARED_MASKS = Path(__file__).resolve().parents[3].parent / "shared" / "kits19-masks"
CFG = SynthConfig(cases=10, size=64, seed=7)


def test_make_case_is_deterministic_and_seed_dependent() -> None:
    a, b = make_case(2, CFG), make_case(2, CFG)
    assert np.array_equal(a.imaging, b.imaging)
    assert np.array_equal(a.segmentation, b.segmentation)
    assert np.array_equal(a.affine, b.affine)
    assert encode_case(a) == encode_case(b)
    other = make_case(2, SynthConfig(cases=10, size=64, seed=8))
    assert other.imaging.shape != a.imaging.shape or not np.array_equal(other.imaging, a.imaging)
    assert not a.imaging.flags.writeable  # frozen case, frozen arrays


def test_shapes_slice_counts_and_the_non_square_case() -> None:
    for index in range(CFG.cases):
        case = make_case(index, CFG)
        slices, rows, cols = case.imaging.shape
        assert case.imaging.dtype == np.float32
        assert CFG.size // 4 <= slices <= CFG.size // 2
        assert rows == CFG.size
        # Case 1 is wide like the real 512x796 KiTS19 case.
        assert cols == (round(CFG.size * 796 / 512) if index == 1 else CFG.size)
        if case.segmentation is not None:
            assert case.segmentation.shape == case.imaging.shape


def test_labels_kidney_and_tumour_in_every_labelled_case() -> None:
    for index in range(CFG.cases - 1):
        seg = make_case(index, CFG).segmentation
        assert seg is not None and seg.dtype == np.uint8
        assert set(np.unique(seg).tolist()) == {0, 1, 2}
        share = (seg > 0).any(axis=(1, 2)).mean()
        assert 0.15 <= share <= 0.6, f"case {index}: kidney in {share:.0%} of slices"
        assert (seg > 0).mean() < 0.05  # foreground is rare, as in KiTS19 (~0.9 %)
    assert make_case(CFG.cases - 1, CFG).segmentation is None


def test_anatomy_needs_more_than_a_threshold() -> None:
    """Air outside the body, a body inside, and kidney intensities shared by other tissue."""
    case = make_case(0, SynthConfig(cases=10, size=96))
    hu, seg = case.imaging, case.segmentation
    assert seg is not None
    assert np.median(hu[:, :4, :4]) < -950  # corners are air
    assert hu.min() >= -1024 and hu.max() > 300  # bone present
    kidney = hu[seg == 1]
    lo, hi = np.percentile(kidney, [10, 90])
    assert 40 < kidney.mean() < 220
    in_range = (hu >= lo) & (hu <= hi)
    # Most voxels in the kidney's own HU range are liver, spleen, muscle, vessels, bowel.
    assert (seg[in_range] > 0).mean() < 0.3
    assert np.array_equal(hu, np.rint(hu))  # integer HU, like real CT


def test_small_cohorts_and_bad_configs() -> None:
    for cases in (1, 2):
        cfg = SynthConfig(cases=cases, size=32)
        for index in range(cases):
            case = make_case(index, cfg)
            assert case.segmentation is not None  # no room for an unlabelled case
            assert case.imaging.shape[1] == case.imaging.shape[2] == 32
    with pytest.raises(KitsError, match="cases must be at least 1"):
        make_case(0, SynthConfig(cases=0))
    with pytest.raises(KitsError, match="size must be at least 16"):
        make_case(0, SynthConfig(size=8))
    with pytest.raises(KitsError, match=r"case index 10 outside 0\.\.9"):
        make_case(10, SynthConfig(cases=10))
    assert make_case(0, SynthConfig(cases=1, size=16, seed=-3)).imaging.shape[1] == 16


def hand_made_mask() -> np.ndarray:
    """Two box 'kidneys' either side of the midline, a tumour on the left one."""
    seg = np.zeros((12, 64, 64), np.uint8)
    seg[3:10, 30:40, 14:24] = 1
    seg[3:10, 30:40, 40:50] = 1
    seg[5:8, 33:38, 46:53] = 2
    return seg


def test_paint_imaging_on_a_hand_made_mask() -> None:
    seg = hand_made_mask()
    hu = paint_imaging(seg, (3.0, 0.8, 0.8), np.random.default_rng(1))
    assert hu.shape == seg.shape and hu.dtype == np.float32
    assert np.isfinite(hu).all()
    assert np.median(hu[:, :3, :3]) < -950
    assert 40 < hu[seg == 1].mean() < 220 and -50 < hu[seg == 2].mean() < 220
    again = paint_imaging(seg, (3.0, 0.8, 0.8), np.random.default_rng(1))
    assert np.array_equal(hu, again)
    empty = paint_imaging(
        np.zeros((4, 32, 40), np.uint16), (5.0, 1.0, 1.0), np.random.default_rng(2)
    )
    assert empty.shape == (4, 32, 40) and np.isfinite(empty).all()
    with pytest.raises(KitsError, match="non-empty 3D array"):
        paint_imaging(seg[0], (3.0, 0.8, 0.8), np.random.default_rng(3))
    with pytest.raises(KitsError, match="three positive numbers"):
        paint_imaging(seg, (3.0, 0.0, 0.8), np.random.default_rng(3))


@pytest.mark.skipif(not SHARED_MASKS.is_dir(), reason="real KiTS19 masks not present")
def test_paint_imaging_on_a_real_kits19_mask() -> None:
    paths = sorted(SHARED_MASKS.glob("case_*/segmentation.nii.gz"))
    if not paths:
        pytest.skip("no masks in shared/kits19-masks")
    smallest = min(paths, key=lambda p: nib.load(p).shape[0])  # header only: cheap
    img = nib.load(smallest)
    seg = np.asarray(img.dataobj)
    spacing = tuple(float(s) for s in img.header.get_zooms())
    hu = paint_imaging(seg, spacing, np.random.default_rng(0))
    assert hu.shape == seg.shape and hu.dtype == np.float32
    assert np.isfinite(hu).all()
    assert 40 < hu[seg == 1].mean() < 220


# --------------------------------------------------------------------------- kits23 cysts

# Recorded before the kits23 cysts were added (when the encoded files were also byte-identical):
# adding them must leave every KiTS19 cohort as it was. Masks and geometry are hashed exactly;
# the imaging, which goes through a BLAS matmul whose rounding varies between CPUs, is pinned by
# its per-case mean and standard deviation.
KITS19_MASKS_SHA256 = "9d3975df32dff6b5eab6c23a38b6dd150eebf966f339e89241454bfb045d4a89"
KITS19_IMAGING_STATS = [
    (-765.3453, 401.8775),
    (-670.1005, 444.0181),
    (-580.0532, 449.6974),
    (-702.2607, 426.4949),
]


def test_a_kits19_cohort_is_unchanged_by_the_cysts() -> None:
    import hashlib

    cfg = SynthConfig(cases=4, size=32, seed=7)
    assert cfg.edition == "kits19"
    h = hashlib.sha256()
    stats = []
    for i in range(cfg.cases):
        c = make_case(i, cfg)
        seg = c.segmentation if c.segmentation is not None else np.zeros(0)
        h.update(np.ascontiguousarray(seg).tobytes())
        h.update(
            repr(
                (c.imaging.shape, np.round(c.affine, 6).tolist(), c.imaging_dtype, c.mask_dtype)
            ).encode()
        )
        hu = c.imaging.astype(np.float64)
        stats.append((hu.mean(), hu.std()))
    assert h.hexdigest() == KITS19_MASKS_SHA256
    np.testing.assert_allclose(stats, KITS19_IMAGING_STATS, atol=2e-3)


def _touches(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``a`` lies in ``b`` or next to it (6-neighbourhood)."""
    grown = a.copy()
    for axis in range(3):
        for shift in (1, -1):
            grown |= np.roll(a, shift, axis)
    return bool((grown & b).any())


def test_kits23_cases_have_cysts_on_kidneys_with_and_without_tumours() -> None:
    cfg = SynthConfig(cases=5, size=64, seed=3, edition="kits23")
    kinds = []
    for i in range(4):
        case = make_case(i, cfg)
        seg = case.segmentation
        kinds.append(tuple(sorted(int(v) for v in np.unique(seg) if v)))
        # The anatomy is the KiTS19 case's: the cysts come from a stream of their own.
        plain = make_case(i, SynthConfig(cases=5, size=64, seed=3))
        assert case.imaging.shape == plain.imaging.shape
        if 3 in kinds[-1]:
            assert _touches(seg == 3, seg == 1), f"case {i}: a cyst off the kidney"
        if i == 1:  # the cyst beside the tumour
            assert _touches(seg == 3, seg == 2)
    assert kinds == [(1, 2, 3), (1, 2, 3), (1, 3), (1, 2)]
    again = make_case(2, cfg)
    assert np.array_equal(again.segmentation, make_case(2, cfg).segmentation)
    assert encode_case(again) == encode_case(make_case(2, cfg))
    assert make_case(4, cfg).segmentation is None  # the unlabelled last case stays
    with pytest.raises(KitsError, match="edition must be one of kits19, kits23"):
        make_case(0, SynthConfig(edition="kits21"))


def test_cysts_are_water_dense_and_homogeneous() -> None:
    """paint_imaging's label 3: 0-20 HU, a texture far below a tumour's."""
    seg = hand_made_mask()
    seg[3:10, 30:40, 14:24] = 1
    seg[2:11, 28:42, 10:20] = 3  # a large cyst on the right kidney
    means, inner = [], np.zeros_like(seg, bool)
    inner[4:9, 31:39, 12:18] = True  # away from the blurred edge
    for k in range(6):
        hu = paint_imaging(seg, (3.0, 0.8, 0.8), np.random.default_rng(k))
        means.append(hu[inner].mean())
    assert all(-5 < m < 25 for m in means), means
