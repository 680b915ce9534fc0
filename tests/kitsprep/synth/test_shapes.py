"""The shapes the painters are built from: ellipsoids, tubes, masked fills, erosion."""

from __future__ import annotations

import math

import numpy as np

from kitsprep.synth.shapes import along, ellipsoid, erode2d, fill, tube


def test_an_ellipsoid_has_its_volume_and_normalised_axes() -> None:
    blob = ellipsoid((40, 64, 64), (20.0, 32.0, 32.0), (10.0, 8.0, 12.0))
    assert blob is not None
    expected = 4 / 3 * math.pi * 10 * 8 * 12
    assert abs(int(blob.mask.sum()) - expected) < 0.05 * expected
    # (t, u, v) are within the unit ball exactly where the mask is set.
    inside = blob.t**2 + blob.u**2 + blob.v**2 <= 1
    assert np.array_equal(inside, blob.mask)


def test_an_ellipsoid_outside_the_volume_is_none_and_one_at_an_edge_is_clipped() -> None:
    assert ellipsoid((10, 32, 32), (-20.0, 16.0, 16.0), (3.0, 3.0, 3.0)) is None
    assert ellipsoid((10, 32, 32), (5.0, 16.0, 200.0), (3.0, 3.0, 3.0)) is None
    edge = ellipsoid((10, 32, 32), (0.0, 0.0, 0.0), (3.0, 3.0, 3.0))
    assert edge is not None and edge.box[0].start == 0 and edge.box[1].start == 0


def test_a_tube_follows_its_per_slice_centres() -> None:
    zs = along(20, 2.5, 30)
    assert zs.tolist() == list(range(3, 20))
    cx = 10 + zs  # drifts one column a slice
    found = tube((20, 32, 48), zs, 16.0, cx, 3.0, 3.0)
    assert found is not None
    box, mask = found
    vol = np.zeros((20, 32, 48), bool)
    vol[box] = mask
    for z in (3, 10, 19):
        cols = np.flatnonzero(vol[z].any(axis=0))
        assert abs(cols.mean() - (10 + z)) < 0.5
    assert not vol[:3].any()
    assert tube((20, 32, 48), along(20, 25, 30), 16.0, 10.0, 3.0, 3.0) is None


def test_fill_only_overwrites_the_allowed_classes() -> None:
    cls = np.zeros((1, 4, 4), np.uint8)
    cls[0, :, 2:] = 5
    box = (slice(0, 1), slice(0, 4), slice(0, 4))
    fill(cls, box, np.ones((1, 4, 4), bool), 7, allowed=(0,))
    assert (cls[0, :, :2] == 7).all() and (cls[0, :, 2:] == 5).all()
    fill(cls, box, np.ones((1, 4, 4), bool), 9)
    assert (cls == 9).all()


def test_erode2d_works_in_plane_only() -> None:
    mask = np.zeros((3, 11, 11), bool)
    mask[:, 2:9, 2:9] = True
    once = erode2d(mask, 1)
    assert once.sum() == 3 * 5 * 5  # every slice loses its rim, no slice vanishes
    assert not erode2d(mask, 4).any()
    assert np.array_equal(erode2d(mask, 0), mask)
